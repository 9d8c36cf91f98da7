"""Writes the bundled Velora suites from the held-out split examples/support/eval.jsonl.

    python examples/eval/make_suites.py

support_qa.jsonl (qa), support_choice.jsonl (choice), support_preference.jsonl (preference).
The eval split holds 8 questions in English, German and French (in that order); each question's
key fact is checked (qa), offered among wrong values (choice), or swapped for a wrong value in a
rejected answer (preference). Every fact is invented (see examples/support/LICENSE.md).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL = HERE.parent / "support" / "eval.jsonl"
LANGS = ["en", "de", "fr"]

# per topic: qa answer (match, answer), choice (right, wrong, wrong) per language, and the
# (right -> wrong) substitutions that turn the reference answer into the rejected one
TOPICS = [
    {"qa": ("regex", r"(?i)closed|geschlossen|ferm[ée]"),
     "choice": {"en": ["It is closed on Sundays.", "It is open on Sundays from 8:00 to 19:00.", "It is open on Sunday mornings only."],
                "de": ["Sonntags ist sie geschlossen.", "Sonntags ist sie von 8:00 bis 19:00 Uhr geöffnet.", "Sonntags ist sie nur vormittags geöffnet."],
                "fr": ["Il est fermé le dimanche.", "Il est ouvert le dimanche de 8 h à 19 h.", "Il est ouvert le dimanche matin seulement."]},
     "swap": [("closed on Sundays", "open on Sundays too"), ("sonntags geschlossen", "auch sonntags geöffnet"), ("fermé le dimanche", "ouvert aussi le dimanche")]},
    {"qa": ("numeric", "12"),
     "choice": {"en": ["12 euros per day", "40 euros per day", "5 euros per day"],
                "de": ["12 Euro pro Tag", "40 Euro pro Tag", "5 Euro pro Tag"],
                "fr": ["12 euros par jour", "40 euros par jour", "5 euros par jour"]},
     "swap": [("12 euros", "45 euros"), ("12 Euro", "45 Euro")]},
    {"qa": ("numeric", "7"),
     "choice": {"en": ["7 years", "1 year", "25 years"], "de": ["7 Jahre", "1 Jahr", "25 Jahre"], "fr": ["7 ans", "1 an", "25 ans"]},
     "swap": [("7-year", "1-year"), ("7 Jahre", "1 Jahr"), ("7 ans", "1 an")]},
    {"qa": ("contains", "VeloraGo"),
     "choice": {"en": ["Book a slot in the VeloraGo app.", "Send the bike by post to the head office.", "Repairs are not offered."],
                "de": ["Einen Termin in der VeloraGo-App buchen.", "Das Rad per Post an die Zentrale schicken.", "Reparaturen werden nicht angeboten."],
                "fr": ["Réserver un créneau dans l'application VeloraGo.", "Envoyer le vélo par la poste au siège.", "Les réparations ne sont pas proposées."]},
     "swap": [("Book a repair slot in the VeloraGo app", "Send your bike by post to our head office"),
              ("Buche einen Reparaturtermin in der VeloraGo-App", "Schick dein Rad per Post an unsere Zentrale"),
              ("Réservez un créneau de réparation dans l'application VeloraGo", "Envoyez votre vélo par la poste à notre siège")]},
    {"qa": ("contains", "0800 555 0134"),
     "choice": {"en": ["0800 555 0134", "0900 123 4567", "112"], "de": ["0800 555 0134", "0900 123 4567", "112"], "fr": ["0800 555 0134", "0900 123 4567", "112"]},
     "swap": [("0800 555 0134", "0900 123 4567")]},
    {"qa": ("numeric", "30"),
     "choice": {"en": ["within 30 days", "within 7 days", "returns are not accepted"],
                "de": ["innerhalb von 30 Tagen", "innerhalb von 7 Tagen", "Rückgaben sind nicht möglich"],
                "fr": ["sous 30 jours", "sous 7 jours", "les retours ne sont pas acceptés"]},
     "swap": [("within 30 days", "within 3 days"), ("innerhalb von 30 Tagen", "innerhalb von 3 Tagen"), ("sous 30 jours", "sous 3 jours")]},
    {"qa": ("numeric", "80"),
     "choice": {"en": ["about 80 km", "about 15 km", "about 300 km"], "de": ["etwa 80 km", "etwa 15 km", "etwa 300 km"], "fr": ["environ 80 km", "environ 15 km", "environ 300 km"]},
     "swap": [("80 km", "15 km")]},
    {"qa": ("numeric", "40"),
     "choice": {"en": ["40 euros a year", "400 euros a year", "it is free"], "de": ["40 Euro im Jahr", "400 Euro im Jahr", "sie ist kostenlos"], "fr": ["40 euros par an", "400 euros par an", "elle est gratuite"]},
     "swap": [("40 euros", "400 euros"), ("40 Euro", "400 Euro")]},
]


def write(path: Path, header: dict, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for obj in [{"suite": header}] + rows:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def main() -> None:
    recs = [json.loads(l) for l in EVAL.read_text(encoding="utf-8").splitlines() if l.strip()]
    assert len(recs) == 3 * len(TOPICS), "eval.jsonl changed: 8 topics x 3 languages expected"
    qa, choice, pref = [], [], []
    for i, r in enumerate(recs):
        t, lang = TOPICS[i // 3], LANGS[i % 3]
        q, ref = r["messages"][0]["content"], r["messages"][-1]["content"]
        how, ans = t["qa"]
        qa.append({"prompt": q, "answer": ans, "match": how, "lang": lang})
        # the right answer rotates through the positions so position bias cannot score
        opts = t["choice"][lang]
        k = i % 3
        order = opts[1:k + 1] + [opts[0]] + opts[k + 1:]
        choice.append({"prompt": q, "choices": order, "answer": k, "lang": lang})
        bad = ref
        for a, b in t["swap"]:
            bad = bad.replace(a, b)
        assert bad != ref, f"no substitution applied to {ref!r}"
        pref.append({"prompt": q, "chosen": ref, "rejected": bad, "lang": lang})
    write(HERE / "support_qa.jsonl", {"kind": "qa", "name": "support-qa", "options": {"max_new_tokens": 48}}, qa)
    write(HERE / "support_choice.jsonl", {"kind": "choice", "name": "support-choice"}, choice)
    write(HERE / "support_preference.jsonl", {"kind": "preference", "name": "support-preference"}, pref)


if __name__ == "__main__":
    main()
