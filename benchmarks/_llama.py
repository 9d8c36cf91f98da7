"""llama.cpp (llama-cpp-python, the `bench` extra) as the benchmarks load it."""

from __future__ import annotations

from pathlib import Path


def load_llama(model_path: Path | str, **kw):
    """`llama_cpp.Llama(model_path, verbose=False, **kw)` with the weights in plain CPU buffers.

    llama-cpp-python 0.3.36 segfaults in its first decode when the weights are repacked for AMX
    (the "extra buffer types"; the Xeon here has AMX), with or without an adapter. Llama() exposes
    no switch for it, so its default model parameters are wrapped while the model loads."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(model_path), verbose=False, **kw)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
