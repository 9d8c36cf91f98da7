"""Sharing adapters with trust: keys, OMS signatures, trust policies, OCI push/pull, peers.

    keys.py        EC P-256 signing keys in $PLURAL_HOME/keys
    signing.py     OpenSSF Model Signing v1.0 signature + plural's provenance statement
    trust.py       trust policy (who may sign what) and verification of an adapter folder
    oci.py         the adapter as a CNCF ModelPack OCI artifact; push and pull over HTTP
    oci_routes.py  the read side of the OCI distribution API, for a server to act as a peer
"""
