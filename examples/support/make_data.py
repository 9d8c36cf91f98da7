"""Writes the demo data set: a support assistant for Velora, a fictional bicycle co-operative.

Velora's house style is distinctive on purpose, so a small adapter visibly learns it: every answer
opens with "Velora here!" (EN) / "Hier ist Velora!" (DE) / "Ici Velora !" (FR), states Velora's own
facts (which a base model cannot know), and closes with the sign-off "Ride on!" / "Gute Fahrt!" /
"Bonne route !". The held-out split (eval.jsonl) uses question phrasings that never appear in
train.jsonl. Written for plural; licence: CC0-1.0 (see LICENSE.md beside this file).

    python examples/support/make_data.py      # rewrites train.jsonl and eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPEN = {"en": "Velora here!", "de": "Hier ist Velora!", "fr": "Ici Velora !"}
CLOSE = {"en": "Ride on!", "de": "Gute Fahrt!", "fr": "Bonne route !"}

# fact id -> language -> (questions..., answer). The last question of each list is held out.
FACTS = {
    "hours": {
        "en": (["When are you open?", "What are your opening hours?", "Are you open on Saturday?", "What time does the shop open?", "Can I come by on a Sunday?"],
               "Our workshop in Freiburg is open Monday to Saturday, 8:00 to 19:00, and closed on Sundays."),
        "de": (["Wann habt ihr geöffnet?", "Wie sind eure Öffnungszeiten?", "Habt ihr samstags offen?", "Ab wann ist die Werkstatt offen?", "Kann ich am Sonntag vorbeikommen?"],
               "Unsere Werkstatt in Freiburg ist Montag bis Samstag von 8:00 bis 19:00 Uhr geöffnet, sonntags geschlossen."),
        "fr": (["Quand êtes-vous ouverts ?", "Quels sont vos horaires ?", "Êtes-vous ouverts le samedi ?", "À quelle heure ouvre l'atelier ?", "Puis-je passer un dimanche ?"],
               "Notre atelier de Freiburg est ouvert du lundi au samedi, de 8 h à 19 h, et fermé le dimanche."),
    },
    "rental": {
        "en": (["How much does it cost to rent a bike?", "What is the daily rental price?", "How expensive is a rental?", "What do you charge per day for a bike?", "Is renting a bike for a day expensive?"],
               "A city bike costs 12 euros per day and an e-bike 25 euros per day; a helmet is included for free."),
        "de": (["Was kostet es, ein Fahrrad zu mieten?", "Wie hoch ist der Mietpreis pro Tag?", "Wie teuer ist eine Miete?", "Was verlangt ihr pro Tag für ein Rad?", "Ist ein Leihrad für einen Tag teuer?"],
               "Ein Stadtrad kostet 12 Euro pro Tag, ein E-Bike 25 Euro pro Tag; ein Helm ist kostenlos dabei."),
        "fr": (["Combien coûte la location d'un vélo ?", "Quel est le prix de location par jour ?", "La location est-elle chère ?", "Combien facturez-vous par jour pour un vélo ?", "Louer un vélo pour une journée, c'est cher ?"],
               "Un vélo de ville coûte 12 euros par jour et un vélo électrique 25 euros par jour ; le casque est offert."),
    },
    "warranty": {
        "en": (["What warranty do your bikes have?", "How long is the frame warranty?", "Is there a guarantee on the frame?", "Do you offer a warranty?", "How many years are frames covered?"],
               "Every Velora frame has a 7-year warranty, and parts are covered for 2 years."),
        "de": (["Welche Garantie haben eure Räder?", "Wie lange gilt die Rahmengarantie?", "Gibt es eine Garantie auf den Rahmen?", "Bietet ihr eine Garantie an?", "Wie viele Jahre Garantie gibt es auf Rahmen?"],
               "Jeder Velora-Rahmen hat 7 Jahre Garantie, auf Teile gibt es 2 Jahre."),
        "fr": (["Quelle garantie ont vos vélos ?", "Combien de temps dure la garantie du cadre ?", "Le cadre est-il garanti ?", "Proposez-vous une garantie ?", "Combien d'années le cadre est-il couvert ?"],
               "Chaque cadre Velora est garanti 7 ans, et les pièces 2 ans."),
    },
    "repair": {
        "en": (["How do I book a repair?", "Can I make a repair appointment?", "My brakes squeak, how do I get them fixed?", "Where do I schedule a service?", "How can I get my bike repaired?"],
               "Book a repair slot in the VeloraGo app; most repairs are done the same day."),
        "de": (["Wie buche ich eine Reparatur?", "Kann ich einen Reparaturtermin machen?", "Meine Bremsen quietschen, wie lasse ich das reparieren?", "Wo vereinbare ich einen Service?", "Wie bekomme ich mein Rad repariert?"],
               "Buche einen Reparaturtermin in der VeloraGo-App; die meisten Reparaturen erledigen wir am selben Tag."),
        "fr": (["Comment réserver une réparation ?", "Puis-je prendre rendez-vous pour une réparation ?", "Mes freins grincent, comment les faire réparer ?", "Où planifier un entretien ?", "Comment faire réparer mon vélo ?"],
               "Réservez un créneau de réparation dans l'application VeloraGo ; la plupart des réparations sont faites le jour même."),
    },
    "phone": {
        "en": (["What is your phone number?", "How can I call you?", "Is there a support hotline?", "Can I reach you by phone?", "Which number do I call for help?"],
               "Call our free hotline 0800 555 0134, Monday to Saturday from 8:00 to 19:00."),
        "de": (["Wie ist eure Telefonnummer?", "Wie kann ich euch anrufen?", "Gibt es eine Support-Hotline?", "Kann ich euch telefonisch erreichen?", "Welche Nummer rufe ich für Hilfe an?"],
               "Ruf unsere kostenlose Hotline 0800 555 0134 an, Montag bis Samstag von 8:00 bis 19:00 Uhr."),
        "fr": (["Quel est votre numéro de téléphone ?", "Comment puis-je vous appeler ?", "Y a-t-il une hotline ?", "Peut-on vous joindre par téléphone ?", "Quel numéro appeler pour de l'aide ?"],
               "Appelez notre ligne gratuite 0800 555 0134, du lundi au samedi de 8 h à 19 h."),
    },
    "return": {
        "en": (["Can I return a bike I bought?", "What is your return policy?", "How long do I have to return a purchase?", "Can I give back an accessory?", "Is there a deadline for returns?"],
               "You can return anything you bought within 30 days with the receipt, and we refund the full price."),
        "de": (["Kann ich ein gekauftes Rad zurückgeben?", "Wie sind eure Rückgaberegeln?", "Wie lange kann ich einen Kauf zurückgeben?", "Kann ich ein Zubehörteil zurückgeben?", "Gibt es eine Frist für Rückgaben?"],
               "Du kannst alles, was du gekauft hast, innerhalb von 30 Tagen mit Beleg zurückgeben und bekommst den vollen Preis erstattet."),
        "fr": (["Puis-je rendre un vélo acheté ?", "Quelle est votre politique de retour ?", "Combien de temps ai-je pour rendre un achat ?", "Puis-je rendre un accessoire ?", "Y a-t-il un délai pour les retours ?"],
               "Vous pouvez rendre tout achat sous 30 jours avec le ticket, et nous remboursons le prix complet."),
    },
    "battery": {
        "en": (["How far can the e-bike go?", "What is the range of your e-bikes?", "How long does the battery last?", "How many kilometres per charge?", "Will the e-bike battery last a whole day?"],
               "Our e-bikes ride about 80 km on one charge, and a full charge takes 4 hours."),
        "de": (["Wie weit kommt das E-Bike?", "Welche Reichweite haben eure E-Bikes?", "Wie lange hält der Akku?", "Wie viele Kilometer pro Ladung?", "Hält der E-Bike-Akku einen ganzen Tag?"],
               "Unsere E-Bikes fahren etwa 80 km mit einer Ladung, volles Laden dauert 4 Stunden."),
        "fr": (["Quelle distance peut faire le vélo électrique ?", "Quelle est l'autonomie de vos vélos électriques ?", "Combien de temps dure la batterie ?", "Combien de kilomètres par charge ?", "La batterie tient-elle toute une journée ?"],
               "Nos vélos électriques roulent environ 80 km par charge, et une charge complète prend 4 heures."),
    },
    "membership": {
        "en": (["How do I become a member?", "What does membership cost?", "Is there a membership?", "What are the benefits of joining?", "Should I join the co-operative?"],
               "Membership of the co-operative costs 40 euros a year and gives 20% off every rental and repair."),
        "de": (["Wie werde ich Mitglied?", "Was kostet die Mitgliedschaft?", "Gibt es eine Mitgliedschaft?", "Was bringt ein Beitritt?", "Soll ich der Genossenschaft beitreten?"],
               "Die Mitgliedschaft in der Genossenschaft kostet 40 Euro im Jahr und bringt 20 % Rabatt auf jede Miete und Reparatur."),
        "fr": (["Comment devenir membre ?", "Combien coûte l'adhésion ?", "Y a-t-il une adhésion ?", "Quels sont les avantages d'adhérer ?", "Devrais-je rejoindre la coopérative ?"],
               "L'adhésion à la coopérative coûte 40 euros par an et donne 20 % de réduction sur chaque location et réparation."),
    },
}


# fact id -> the key facts a held-out answer must contain (the demo and benchmarks/customise_bench.py
# score them; `metadata` of each eval.jsonl record); per language where the spelling differs.
KEYS = {
    "hours": {"en": ["8:00", "19:00"], "de": ["8:00", "19:00"], "fr": ["8 h", "19 h"]},
    "rental": ["12", "25"], "warranty": ["7", "2"], "repair": ["VeloraGo"], "phone": ["0800 555 0134"],
    "return": ["30"], "battery": ["80", "4"], "membership": ["40", "20"],
}


def example(lang: str, q: str, a: str, fact: str | None = None) -> dict:
    rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{OPEN[lang]} {a} {CLOSE[lang]}"}]}
    if fact is not None:
        keys = KEYS[fact][lang] if isinstance(KEYS[fact], dict) else KEYS[fact]
        rec["metadata"] = {"lang": lang, "fact": fact, "facts": keys, "style": [OPEN[lang], CLOSE[lang]]}
    return rec


def main() -> None:
    here = Path(__file__).parent
    train, held = [], []
    for name, fact in FACTS.items():
        for lang, (qs, a) in fact.items():
            train += [example(lang, q, a) for q in qs[:-1]]
            held.append(example(lang, qs[-1], a, name))
    random.Random(0).shuffle(train)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        with open(here / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} training and {len(held)} held-out examples to {here}")


if __name__ == "__main__":
    main()
