"""Writes the bundled federation data set: three organisations, each with its own topic and house
style, which is what makes the split non-IID (run: python examples/federate/make_data.py).

    orgs/clinic   health-centre questions, answered as a triage note    (English)
    orgs/bank     banking questions, answered with a reference line     (English)
    orgs/mairie   town-hall questions, answered in French               (French)

Each folder holds train.jsonl and eval.jsonl (held out: other slot values, same templates), the
layout `plural node start --data DIR` expects. The records are generated from templates with a
fixed seed, so the files are reproducible; they are committed, this script documents them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CLINIC = {
    "system": "You are the triage assistant of the Northside Health Centre.",
    "slots": {
        "symptom": ["a mild fever", "a sore throat", "a dry cough", "back pain", "a headache", "a sprained ankle",
                    "itchy eyes", "an earache", "a rash on the arm", "heartburn", "a runny nose", "knee pain",
                    "trouble sleeping", "a stomach ache", "a twisted wrist", "dizziness when standing"],
        "days": ["one day", "two days", "three days", "four days", "a week", "ten days", "two weeks"],
        "who": ["I", "my son", "my daughter", "my father", "my wife", "my husband", "my mother"],
    },
    "q": ["{who_cap} {have} had {symptom} for {days}. What should we do?",
          "Is it serious that {who} {have} had {symptom} for {days}?",
          "Can the centre help? {who_cap} {have} {symptom} since {days} ago."],
    "a": "Triage note: {symptom} for {days}. Priority: {prio}. Advice: {advice} "
         "Book at the Northside desk or call 0800 123 456; call 112 if it gets suddenly worse.",
}
CLINIC_PRIO = {"one day": ("routine", "rest, drink water and watch how it develops."),
               "two days": ("routine", "rest, drink water and watch how it develops."),
               "three days": ("routine", "rest and take paracetamol if needed."),
               "four days": ("soon", "see a nurse this week."),
               "a week": ("soon", "see a nurse this week."),
               "ten days": ("soon", "see a doctor within two days."),
               "two weeks": ("urgent", "see a doctor today.")}

BANK = {
    "system": "You are the customer assistant of Harbour Savings Bank.",
    "slots": {
        "product": ["a savings account", "a credit card", "a mortgage", "a personal loan", "a business account",
                    "a student account", "a joint account", "an overdraft", "a fixed-term deposit", "a debit card",
                    "a pension plan", "a car loan", "a travel card", "an ISA", "a current account", "a home insurance policy"],
        "action": ["open", "close", "change", "cancel", "upgrade"],
        "channel": ["the app", "a branch", "the phone line"],
    },
    "q": ["How do I {action} {product} through {channel}?",
          "Can I {action} {product} using {channel}?",
          "I want to {action} {product}. Is {channel} the right way?"],
    "a": "Harbour Savings, request type: {action_up} / {product}. Steps: 1) sign in to {channel}; "
         "2) choose '{action_cap} a product'; 3) confirm with your PIN. Processing time: {days} working days. "
         "Ref: HSB-{code}.",
}

MAIRIE = {
    "system": "Tu es l'assistant de la mairie de Saint-Aubin.",
    "slots": {
        "doc": ["une carte d'identité", "un passeport", "un acte de naissance", "un permis de construire",
                "une carte électorale", "un certificat de résidence", "un livret de famille", "une autorisation de stationnement",
                "un acte de mariage", "une attestation d'accueil", "un permis de démolir", "une inscription à la cantine",
                "une carte de bibliothèque", "un badge de déchetterie", "une place en crèche", "un acte de décès"],
        "when": ["cette semaine", "avant l'été", "le mois prochain", "demain", "avant la rentrée"],
    },
    "q": ["Comment obtenir {doc} {when} ?",
          "Je voudrais demander {doc} {when}. Que faut-il faire ?",
          "Est-ce possible d'avoir {doc} {when} ?"],
    "a": "Mairie de Saint-Aubin — démarche : {doc}. Pièces à fournir : justificatif de domicile et pièce d'identité. "
         "Dépôt : guichet unique, du lundi au vendredi de 9 h à 17 h. Délai habituel : {days} jours.",
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def clinic(rng: random.Random, slots: dict) -> dict:
    who, symptom, days = slots["who"], slots["symptom"], slots["days"]
    have = "have" if who == "I" else "has"
    q = rng.choice(CLINIC["q"]).format(who=who, who_cap=_cap(who), have=have, symptom=symptom, days=days)
    prio, advice = CLINIC_PRIO[days]
    a = CLINIC["a"].format(symptom=_cap(symptom), days=days, prio=prio, advice=_cap(advice))
    return _chat(CLINIC["system"], q, a)


def bank(rng: random.Random, slots: dict) -> dict:
    q = rng.choice(BANK["q"]).format(**slots)
    days = {"open": 2, "close": 5, "change": 3, "cancel": 1, "upgrade": 4}[slots["action"]]
    a = BANK["a"].format(action_up=slots["action"].upper(), action_cap=_cap(slots["action"]), product=slots["product"],
                         channel=slots["channel"], days=days, code=f"{rng.randrange(1000, 9999)}")
    return _chat(BANK["system"], q, a)


def mairie(rng: random.Random, slots: dict) -> dict:
    q = rng.choice(MAIRIE["q"]).format(**slots)
    days = 5 + 5 * (len(slots["doc"]) % 4)
    return _chat(MAIRIE["system"], q, MAIRIE["a"].format(doc=slots["doc"], days=days))


def _chat(system: str, q: str, a: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _combos(rng: random.Random, spec: dict) -> list[dict]:
    """Every combination of slot values, shuffled."""
    import itertools

    keys = list(spec["slots"])
    out = [dict(zip(keys, c)) for c in itertools.product(*(spec["slots"][k] for k in keys))]
    rng.shuffle(out)
    return out


def main(n_train: int = 60, n_eval: int = 16) -> None:
    for name, spec, make in (("clinic", CLINIC, clinic), ("bank", BANK, bank), ("mairie", MAIRIE, mairie)):
        rng = random.Random(f"plural-federate-{name}")
        # Held-out examples use slot values the training set never pairs the same way, and the
        # first slot's last four values appear only in eval.
        first = list(spec["slots"])[0]
        held = set(spec["slots"][first][-4:])
        combos = _combos(rng, spec)
        train = [c for c in combos if c[first] not in held][:n_train]
        ev = [c for c in combos if c[first] in held][:n_eval]
        d = HERE / "orgs" / name
        d.mkdir(parents=True, exist_ok=True)
        for fname, rows in (("train.jsonl", train), ("eval.jsonl", ev)):
            with open(d / fname, "w", encoding="utf-8") as f:
                for c in rows:
                    f.write(json.dumps(make(rng, c), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
