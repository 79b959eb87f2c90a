"""How the original CHAIR release reads COCO objects in a caption (Rohrbach et al. 2018, the
`chair.py` behind CHAIR_s / CHAIR_i in the hallucination papers' tables, SVP's included).

Written by us from the behaviour of that release, so that `protocol="original"` gives its numbers:

1. the caption is lower-cased and split into words as NLTK's `word_tokenize` does for captions
   (punctuation, a sentence's final period and clitics such as 's and n't split off; hyphenated
   words, "a/b" and numbers such as 3.5 stay whole) - `tokenize`;
2. every word is singularised by pattern.en's rules (Bermi Ferrer's inflector) - `singularize`;
3. reading left to right, a pair of words that is one of its two-word names is merged ("hot dog",
   "teddy bear"), "baby"/"adult" + an animal word is that animal (so "a baby elephant" is no
   person), "passenger jet"/"passenger train" is the vehicle, "bow tie" a tie, "toilet seat" a
   toilet; a caption naming a toilet loses its "seat" words (no chair);
4. each remaining word that is in its synonym list (`SYNONYMS`) is a mention of that COCO object,
   however often it repeats.

Its known quirks, reproduced because its numbers depend on them: the singulariser turns "bus" into
"bu" and "ties" into "ty" (a singular bus, a plural tie and "tennis" are not read: "buses" is a
bus, "tennis racket" is read through "racket", "table tennis" is a dining table); "glass" becomes
"glas" ("wine glass" is still read, through its merged pair); "player", "baby", "adult" and
"passenger" are persons ("a baseball player" names a person); "computer" is a laptop, "trolley" a
bus, "bow" a tie, "seat" a chair. Three entries of its list never match ("motor bike" and
"cheesecake" carry a leading space there, "iPhone" a capital in lower-cased text); they are left
out here, which reads exactly as the release does.

"train track(s)" is one word of the release's pair list, so it names no train ("a train on the
train tracks" is one mention).

Checked against a port of the release's reader on its own libraries (NLTK 3.10's word tokenizer,
which splits off curly quotes and long dashes, and pattern's singularize): on the 18,000 model
captions of the POPE release's caption_data (68,279 object mentions) the same objects are read
from every caption, and from every one of the same captions rewritten with curly apostrophes,
quotes and em dashes but 18, where a sentence's final period is followed by a line break and then
a closing quote (the release reads "table.\n”" as one unknown word, refloop reads the table).
Other odd punctuation runs ("dogs''", "sheep.&") may split differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The release's synonym list: COCO category (its canonical name) -> the words read as it.
_SYNONYM_LINES = """
person: girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister,
  biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman,
  pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker, trespasser, patient,
  politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student,
  camper, driver, solider, hunter, shopper, villager
bicycle: bike, unicycle, minibike, trike
car: automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle: scooter, motor cycle, motorbike, moped
airplane: jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus: minibus, trolley
train: locomotive, tramway, caboose
truck: pickup, lorry, hauler, firetruck
boat: ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon,
  houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat,
  lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light: street light, traffic signal, stop light, streetlight, stoplight
fire hydrant: hydrant
stop sign:
parking meter:
bench: pew
bird: ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch,
  pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird,
  kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant,
  rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin,
  vulture, condor, macaw, peafowl, cockatoo, songbird
cat: kitten, feline, tabby
dog: puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle,
  labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever,
  brindle, hound, whippet, husky
horse: colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep: lamb, ram, goat, ewe
cow: cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant:
bear: panda
zebra:
giraffe:
backpack: knapsack
umbrella:
handbag: wallet, purse, briefcase
tie: bow, bow tie
suitcase: suit case, luggage
frisbee:
skis: ski
snowboard:
sports ball: ball
kite:
baseball bat:
baseball glove:
skateboard:
surfboard: longboard, skimboard, shortboard, wakeboard
tennis racket: racket
bottle:
wine glass:
cup:
fork:
knife: pocketknife, knive
spoon:
bowl: container
banana:
apple:
sandwich: burger, sub, cheeseburger, hamburger
orange:
broccoli:
carrot:
hot dog:
pizza:
donut: doughnut, bagel
cake: cupcake, shortcake, coffeecake, pancake
chair: seat, stool
couch: sofa, recliner, futon, loveseat, settee, chesterfield
potted plant: houseplant
bed:
dining table: table, desk
toilet: urinal, commode, lavatory, potty
tv: monitor, televison, television
laptop: computer, notebook, netbook, lenovo, macbook, laptop computer
mouse:
remote:
keyboard:
cell phone: mobile phone, phone, cellphone, telephone, phon, smartphone
microwave:
oven: stovetop, stove, stove top oven
toaster:
sink:
refrigerator: fridge, freezer
book:
clock:
vase:
scissors:
teddy bear: teddybear
hair drier: hairdryer
toothbrush:
"""


def _parse_synonyms(text: str) -> dict[str, str]:
    """word -> COCO object, from "object: word, word" lines (indented lines continue the one above)."""
    entries = re.sub(r"\n\s+", " ", text.strip()).splitlines()
    out: dict[str, str] = {}
    for entry in entries:
        obj, _, rest = entry.partition(":")
        for word in (obj, *(w.strip() for w in rest.split(",") if w.strip())):
            if out.setdefault(word, obj) != obj:
                raise ValueError(f"{word!r} names both {out[word]!r} and {obj!r}")
    return out


SYNONYMS: dict[str, str] = _parse_synonyms(_SYNONYM_LINES)
OBJECTS: tuple[str, ...] = tuple(dict.fromkeys(SYNONYMS.values()))

# Word pairs read as one word (after singularisation): the pair -> the word it stands for.
_PAIRS_KEPT = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier", "potted plant",
    "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
PAIRS: dict[str, str] = (
    {pair: pair for pair in _PAIRS_KEPT}
    | {f"{age} {animal}": animal for animal in _ANIMAL_WORDS for age in ("baby", "adult")}
    | {"passenger jet": "jet", "passenger train": "train", "bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}
)


# ---- words as NLTK's word_tokenize splits a lower-cased caption ------------------------------------

# NLTK >= 3.5 also splits off curly and angle quotes and the figure, en and em dashes (U+2012-2015).
_SEPARATE = re.compile('(\\.{2,}|--|[;@#$%&?!()\\[\\]{}<>"`*\u00ab\u00bb\u2018\u2019\u201c\u201d\u201e\u2012-\u2015])')
_COLON_COMMA = re.compile(r"([:,])([^\d]|$)")  # kept before a digit (1,000 and 10:30); takes the next character
_OPENING_QUOTE = re.compile(r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_FINAL_PERIOD = re.compile(r"(?<=[^\s.])\.(?=[^\w.]|$)")  # a sentence ends after an ordinary word
_CLITIC = re.compile(r"(?<=[^\s'])('s|'m|'d|'ll|'re|'ve|n't|')(?=\s|$)")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of a caption, split as NLTK's word_tokenize splits them: punctuation apart,
    the period that ends a word, clitics ('s, n't, ...) as words of their own; "hot-dog", "cat/dog"
    and "3.5" stay one word each."""
    text = _FINAL_PERIOD.sub(" .", text.lower())
    text = _OPENING_QUOTE.sub("' ", text)
    text = _SEPARATE.sub(r" \1 ", text)
    text = _COLON_COMMA.sub(r" \1 \2", text)
    text = _CLITIC.sub(r" \1", text)
    return text.split()


# ---- pattern.en's singular of a word --------------------------------------------------------------

# A word that ends one of these words is left as it is (pattern.en compares the other way round:
# "ice" is a suffix of "rice", so "ice" stays).
_UNINFLECTED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks proceedings "
    "whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder jackanapes scissors "
    "christmas gallows mackerel series clippers georgia measles shears cod graffiti mews species contretemps mumps "
    "swine corps news swiss "
    "advice equipment happiness luggage software bread fruit information mathematics progress understanding butter "
    "furniture ketchup mayonnaise research water cheese garbage knowledge meat rice electricity gravel love mustard sand"
).split()
# A word ending in one of these + "s" is left as it is, lower-cased ("doggies" stays "doggies").
# Two of the release's entries start with a literal "^" and so never match ("ties" -> "ty").
_IE_WORDS = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie oldie "
    "stoolie yuppie birdie freebie junkie sweetie zombie bogie goonie laddie pixie techie bombie groupie laramie "
    "quickie collie hankie lingerie reverie toughie cookie hippie meanie rookie valkyrie"
).split()
# Irregular endings: a word ending in the key has it replaced ("women" -> "woman", "four" -> "fmy").
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}  # fmt: skip
# Then the first matching ending rule (pattern, replacement); the last one drops any final "s".
_ENDINGS = [
    (r"(.)ae$", r"\1a"), (r"(.)itis$", r"\1itis"), (r"(.)eaux$", r"\1eau"), (r"(quiz)zes$", r"\1"),
    (r"(matr)ices$", r"\1ix"), (r"(ap|vert|ind)ices$", r"\1ex"), (r"^(ox)en", r"\1"), (r"(alias|status)es$", r"\1"),
    (r"([octp|vir])i$", r"\1us"),  # a character class in the release: any of those letters (or "|") before a final i
    (r"(cris|ax|test)es$", r"\1is"), (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"), (r"(bus)es$", r"\1"),
    (r"([m|l])ice$", r"\1ouse"), (r"(x|ch|ss|sh)es$", r"\1"), (r"(m)ovies$", r"\1ovie"), (r"(.)ombies$", r"\1ombie"),
    (r"(s)eries$", r"\1eries"), (r"([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(sive)s$", r"\1"),
    (r"(tive)s$", r"\1"), (r"(hive)s$", r"\1"), (r"([^f])ves$", r"\1fe"),
    (r"(^analy)ses$", r"\1sis"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(.)opses$", r"\1opsis"), (r"(.)yses$", r"\1ysis"), (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(.)oses$", r"\1osis"),
    (r"([ti])a$", r"\1um"), (r"(n)ews$", r"\1ews"), (r"s$", ""),
]  # fmt: skip
_ENDING_RULES = [(re.compile(pattern, re.IGNORECASE), replacement) for pattern, replacement in _ENDINGS]
_PREPOSITIONS = frozenset(
    "about before during of till above behind except off to across below for on under after beneath from onto until "
    "among beside in out unto around besides into over upon at between near since with athwart betwixt beyond but by".split()
)


def singularize(word: str) -> str:
    """A word's singular by pattern.en's rules, quirks included ("bus" -> "bu", "glass" -> "glas",
    "ties" -> "ty", "tennis" -> "tenni", "people" -> "person", "knives" -> "knife")."""
    if "-" in word:
        head, *rest = word.split("-")
        if rest and rest[0] in _PREPOSITIONS:  # "mothers-in-law"
            return singularize(head) + "-" + "-".join(rest)
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(kept.endswith(lower) for kept in _UNINFLECTED):
        return word
    if any(lower.endswith(ie + "s") for ie in _IE_WORDS):
        return lower
    for ending, singular in _IRREGULAR.items():
        if lower.endswith(ending):
            return word[: len(word) - len(ending)] + singular
    for rule, replacement in _ENDING_RULES:
        if rule.search(word):
            return rule.sub(replacement, word, count=1)
    return word


# ---- the reader ------------------------------------------------------------------------------------


def read_words(text: str) -> list[str]:
    """The caption's words after singularisation and the release's pair rules (step 1-3 above)."""
    words = [singularize(w) for w in tokenize(text)]
    merged, i = [], 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if i + 1 < len(words) and pair in PAIRS:
            merged.append(PAIRS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return merged


@dataclass(frozen=True)
class ChairWords:
    """The original CHAIR reader as a table: `matches(text)` gives (word, COCO object) for every
    mention in reading order, repeats included, as `SynonymTable.matches` does for refloop's tables."""

    name: str = "coco-chair"
    objects: tuple[str, ...] = OBJECTS

    def matches(self, text: str) -> list[tuple[str, str]]:
        return [(w, SYNONYMS[w]) for w in read_words(text) if w in SYNONYMS]


def chair_words() -> ChairWords:
    return ChairWords()
