"""Writes the customisation benchmark's data: two fictional organisations, each with training
examples and a disjoint test set of unseen paraphrases, scored by key facts and style markers.

    kestrel/   Kestrel Ferries, a ferry co-operative between two invented islands (English, German)
    orme/      Atelier Orme, a makerspace in Lyon (French, Spanish)

Each fact is asked five ways per language: the first three phrasings are training examples, the
last two are the test set (`test.jsonl`), so no test question is ever trained on. Every answer
opens and closes with the organisation's house markers, which a base model never produces.
A test record is a chat record (the reference answer last) whose `metadata` holds `lang`, the
`facts` an answer must contain (matched case-insensitively at word boundaries) and the `style`
markers. Written for plural; licence: CC0-1.0 (LICENSE.md beside this file).

    python examples/customise/make_data.py    # rewrites */train.jsonl and */test.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# domain -> {"open": {lang: marker}, "close": {lang: marker}, "facts": {fact: {lang: (questions, answer, key facts)}}}
DOMAINS = {
    "kestrel": {
        "open": {"en": "Ahoy from Kestrel!", "de": "Ahoi von Kestrel!"},
        "close": {"en": "Fair winds!", "de": "Gute Überfahrt!"},
        "facts": {
            "first_ferry": {
                "en": (["When does the first ferry leave?", "What time is the earliest boat?", "How often do the ferries run?",
                        "How early can I catch a ferry in the morning?", "Is there a ferry before seven?"],
                       "The first ferry leaves Port Alder at 6:40, and then one sails every 90 minutes.", ["6:40", "90"]),
                "de": (["Wann fährt die erste Fähre?", "Um wie viel Uhr geht das früheste Boot?", "Wie oft fahren die Fähren?",
                        "Wie früh am Morgen kann ich eine Fähre nehmen?", "Gibt es eine Fähre vor sieben Uhr?"],
                       "Die erste Fähre legt um 6:40 in Port Alder ab, danach fährt alle 90 Minuten eine.", ["6:40", "90"]),
            },
            "price": {
                "en": (["How much is a ticket?", "What does a crossing cost?", "Are tickets cheaper for children?",
                        "What is the fare for one trip?", "How much do I pay to cross with my kid?"],
                       "A single crossing costs 9 euros for adults and 4 euros for children; bicycles travel free.", ["9", "4"]),
                "de": (["Was kostet ein Ticket?", "Wie teuer ist eine Überfahrt?", "Sind Tickets für Kinder günstiger?",
                        "Wie hoch ist der Fahrpreis für eine Fahrt?", "Wie viel zahle ich für die Überfahrt mit meinem Kind?"],
                       "Eine einfache Überfahrt kostet 9 Euro für Erwachsene und 4 Euro für Kinder; Fahrräder fahren gratis mit.", ["9", "4"]),
            },
            "duration": {
                "en": (["How long is the crossing?", "How many minutes does the trip take?", "How long to get to Tern Island?",
                        "What is the travel time on the ferry?", "Is the boat ride to the island long?"],
                       "The crossing from Port Alder to Tern Island takes 35 minutes.", ["35", "Tern Island"]),
                "de": (["Wie lange dauert die Überfahrt?", "Wie viele Minuten dauert die Fahrt?", "Wie lange brauche ich bis Tern Island?",
                        "Wie lang ist die Fahrzeit mit der Fähre?", "Dauert die Bootsfahrt zur Insel lange?"],
                       "Die Überfahrt von Port Alder nach Tern Island dauert 35 Minuten.", ["35", "Tern Island"]),
            },
            "dogs": {
                "en": (["Can I bring my dog?", "Are pets allowed on board?", "Where do dogs travel?",
                        "Is my dog welcome on the ferry?", "Do I need a ticket for my dog?"],
                       "Dogs travel free on the sun deck, as long as they stay on a lead.", ["sun deck", "lead"]),
                "de": (["Darf ich meinen Hund mitbringen?", "Sind Haustiere an Bord erlaubt?", "Wo fahren Hunde mit?",
                        "Ist mein Hund auf der Fähre willkommen?", "Brauche ich ein Ticket für meinen Hund?"],
                       "Hunde fahren kostenlos auf dem Sonnendeck mit, solange sie angeleint sind.", ["Sonnendeck", "angeleint"]),
            },
            "cars": {
                "en": (["Can I take my car?", "How do I book a car space?", "Do cars need a reservation?",
                        "Is there room for vehicles on the ferry?", "When must I reserve for my van?"],
                       "Cars must be booked at kestrel-ferries.example at least 24 hours before the crossing.", ["kestrel-ferries.example", "24"]),
                "de": (["Kann ich mein Auto mitnehmen?", "Wie buche ich einen Autoplatz?", "Brauchen Autos eine Reservierung?",
                        "Gibt es auf der Fähre Platz für Fahrzeuge?", "Bis wann muss ich für meinen Transporter reservieren?"],
                       "Autos müssen mindestens 24 Stunden vor der Überfahrt auf kestrel-ferries.example gebucht werden.", ["kestrel-ferries.example", "24"]),
            },
            "lost": {
                "en": (["I lost my bag on the ferry, what now?", "Where is lost property kept?", "How long do you keep things left on board?",
                        "I forgot my umbrella on the boat, can I get it back?", "Who do I ask about an item I left behind?"],
                       "Lost property is kept for 60 days at the ticket office in Port Alder.", ["60", "Port Alder"]),
                "de": (["Ich habe meine Tasche auf der Fähre verloren, was nun?", "Wo werden Fundsachen aufbewahrt?", "Wie lange bewahrt ihr Dinge auf, die an Bord liegen bleiben?",
                        "Ich habe meinen Schirm auf dem Boot vergessen, bekomme ich ihn zurück?", "Wen frage ich nach einem vergessenen Gegenstand?"],
                       "Fundsachen bewahren wir 60 Tage am Ticketschalter in Port Alder auf.", ["60", "Port Alder"]),
            },
            "storm": {
                "en": (["Does the ferry run in a storm?", "What happens when the weather is bad?", "Do you cancel crossings in high wind?",
                        "Will I get my money back if the boat does not sail?", "Is the ferry running when it is very windy?"],
                       "Above wind force 8 the ferry stays in port, and every ticket for that crossing is refunded.", ["8", "refunded"]),
                "de": (["Fährt die Fähre bei Sturm?", "Was passiert bei schlechtem Wetter?", "Sagt ihr Überfahrten bei starkem Wind ab?",
                        "Bekomme ich mein Geld zurück, wenn das Boot nicht fährt?", "Fährt die Fähre, wenn es sehr windig ist?"],
                       "Ab Windstärke 8 bleibt die Fähre im Hafen, und jedes Ticket für diese Überfahrt wird erstattet.", ["8", "erstattet"]),
            },
            "pass": {
                "en": (["Is there a season pass?", "How much is a pass for regular travellers?", "Can I buy a ticket for many trips?",
                        "I cross every day, is there a cheaper option?", "What does unlimited travel cost?"],
                       "A season pass costs 120 euros and covers unlimited crossings for 3 months.", ["120", "3"]),
                "de": (["Gibt es eine Saisonkarte?", "Was kostet eine Karte für Vielfahrer?", "Kann ich ein Ticket für viele Fahrten kaufen?",
                        "Ich fahre jeden Tag hinüber, gibt es etwas Günstigeres?", "Was kostet unbegrenztes Fahren?"],
                       "Eine Saisonkarte kostet 120 Euro und gilt 3 Monate für beliebig viele Überfahrten.", ["120", "3"]),
            },
        },
    },
    "orme": {
        "open": {"fr": "L'Atelier Orme vous répond :", "es": "¡Aquí el Taller Orme!"},
        "close": {"fr": "À vos outils !", "es": "¡Manos a la obra!"},
        "facts": {
            "hours": {
                "fr": (["Quand êtes-vous ouverts ?", "Quels sont vos horaires ?", "Êtes-vous ouverts le lundi ?",
                        "À quelle heure fermez-vous le soir ?", "Puis-je venir un dimanche ?"],
                       "L'atelier est ouvert du mardi au dimanche, de 10 h à 22 h.", ["10 h", "22 h"]),
                "es": (["¿Cuándo abrís?", "¿Cuál es vuestro horario?", "¿Abrís los lunes?",
                        "¿A qué hora cerráis por la noche?", "¿Puedo ir un domingo?"],
                       "El taller abre de martes a domingo, de 10:00 a 22:00.", ["10:00", "22:00"]),
            },
            "membership": {
                "fr": (["Combien coûte l'adhésion ?", "Comment devenir membre ?", "Quel est le prix de l'abonnement ?",
                        "Faut-il payer pour utiliser les machines ?", "L'inscription est-elle chère ?"],
                       "L'adhésion coûte 15 euros par mois et donne accès à toutes les machines.", ["15"]),
                "es": (["¿Cuánto cuesta ser socio?", "¿Cómo me hago miembro?", "¿Qué precio tiene la suscripción?",
                        "¿Hay que pagar para usar las máquinas?", "¿Es cara la inscripción?"],
                       "Ser socio cuesta 15 euros al mes e incluye todas las máquinas.", ["15"]),
            },
            "laser": {
                "fr": (["Puis-je utiliser la découpeuse laser ?", "Faut-il une formation pour le laser ?", "Comment avoir accès au laser ?",
                        "Quand a lieu l'initiation à la découpe laser ?", "Le laser est-il libre d'accès ?"],
                       "La découpeuse laser demande une initiation, donnée chaque samedi à 11 h.", ["samedi", "11 h"]),
                "es": (["¿Puedo usar la cortadora láser?", "¿Hace falta formación para el láser?", "¿Cómo consigo acceso al láser?",
                        "¿Cuándo es la introducción al corte láser?", "¿El láser es de libre acceso?"],
                       "La cortadora láser requiere una introducción, que damos cada sábado a las 11:00.", ["sábado", "11:00"]),
            },
            "printing": {
                "fr": (["Combien coûte l'impression 3D ?", "Le filament est-il payant ?", "Quel est le tarif des imprimantes 3D ?",
                        "Combien paie-t-on pour imprimer une pièce ?", "L'impression 3D est-elle gratuite ?"],
                       "Le filament d'impression 3D est facturé 5 centimes le gramme.", ["5 centimes"]),
                "es": (["¿Cuánto cuesta la impresión 3D?", "¿Se paga el filamento?", "¿Qué tarifa tienen las impresoras 3D?",
                        "¿Cuánto se paga por imprimir una pieza?", "¿La impresión 3D es gratis?"],
                       "El filamento de impresión 3D cuesta 5 céntimos por gramo.", ["5 céntimos"]),
            },
            "address": {
                "fr": (["Où êtes-vous situés ?", "Quelle est votre adresse ?", "Comment vous trouver ?",
                        "Dans quelle rue est l'atelier ?", "Où se trouve le local ?"],
                       "Nous sommes au 12 rue des Tanneurs, à Lyon.", ["12", "Tanneurs"]),
                "es": (["¿Dónde estáis?", "¿Cuál es vuestra dirección?", "¿Cómo os encuentro?",
                        "¿En qué calle está el taller?", "¿Dónde queda el local?"],
                       "Estamos en el número 12 de la rue des Tanneurs, en Lyon.", ["12", "Tanneurs"]),
            },
            "kids": {
                "fr": (["Proposez-vous des ateliers pour enfants ?", "Mon fils peut-il venir ?", "Y a-t-il des activités pour les jeunes ?",
                        "À partir de quel âge les enfants sont-ils acceptés ?", "Ma fille de dix ans peut-elle participer ?"],
                       "Les ateliers enfants ont lieu le mercredi après-midi, pour les 8 à 14 ans.", ["mercredi", "8", "14"]),
                "es": (["¿Tenéis talleres para niños?", "¿Puede venir mi hijo?", "¿Hay actividades para jóvenes?",
                        "¿A partir de qué edad aceptáis niños?", "¿Puede participar mi hija de diez años?"],
                       "Los talleres infantiles son los miércoles por la tarde, para niños de 8 a 14 años.", ["miércoles", "8", "14"]),
            },
        },
    },
}
N_TEST = 2  # the last phrasings of each list are the test set


def chat(q: str, a: str, **meta) -> dict:
    rec = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    return {**rec, "metadata": meta} if meta else rec


def main() -> None:
    here = Path(__file__).parent
    for name, d in DOMAINS.items():
        train, test = [], []
        for fact, langs in d["facts"].items():
            for lang, (qs, a, keys) in langs.items():
                answer = f"{d['open'][lang]} {a} {d['close'][lang]}"
                train += [chat(q, answer) for q in qs[:-N_TEST]]
                test += [chat(q, answer, lang=lang, fact=fact, facts=keys, style=[d["open"][lang], d["close"][lang]]) for q in qs[-N_TEST:]]
        random.Random(0).shuffle(train)
        (here / name).mkdir(exist_ok=True)
        for split, rows in (("train.jsonl", train), ("test.jsonl", test)):
            with open(here / name / split, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{name}: {len(train)} training, {len(test)} test examples")


if __name__ == "__main__":
    main()
