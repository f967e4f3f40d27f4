"""Raw word lists behind the task suite.

Plain data, hand-checked. Every list maps one input to exactly one output, so each
task is a function. Words were chosen to be common English (so hub models such as GPT-2
know them) and to overlap across tasks (so a bare query is ambiguous until the
demonstrations say which task is meant).
"""

from __future__ import annotations

ANTONYMS: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("tall", "short"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("young", "old"), ("rich", "poor"),
    ("hard", "soft"), ("wet", "dry"), ("early", "late"), ("strong", "weak"),
    ("high", "low"), ("loud", "quiet"), ("thick", "thin"), ("wide", "narrow"),
    ("clean", "dirty"), ("full", "empty"), ("open", "closed"), ("good", "bad"),
    ("true", "false"), ("first", "last"), ("near", "far"), ("deep", "shallow"),
    ("cheap", "expensive"), ("sharp", "dull"), ("smooth", "rough"), ("safe", "dangerous"),
    ("easy", "difficult"), ("sweet", "sour"), ("alive", "dead"), ("inside", "outside"),
    ("above", "below"), ("push", "pull"), ("win", "lose"), ("buy", "sell"),
    ("give", "take"), ("day", "night"), ("up", "down"), ("left", "right"),
    ("black", "white"), ("north", "south"), ("east", "west"), ("before", "after"),
    ("always", "never"), ("more", "less"), ("friend", "enemy"), ("top", "bottom"),
    ("front", "back"), ("awake", "asleep"), ("polite", "rude"), ("public", "private"),
    ("simple", "complex"), ("ancient", "modern"), ("wild", "tame"), ("fresh", "stale"),
    ("tight", "loose"), ("generous", "selfish"), ("brave", "cowardly"),
]

PRESENT_PAST: list[tuple[str, str]] = [
    ("walk", "walked"), ("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"),
    ("swim", "swam"), ("sing", "sang"), ("write", "wrote"), ("take", "took"),
    ("give", "gave"), ("buy", "bought"), ("sell", "sold"), ("win", "won"), ("lose", "lost"),
    ("think", "thought"), ("bring", "brought"), ("teach", "taught"), ("catch", "caught"),
    ("fly", "flew"), ("draw", "drew"), ("grow", "grew"), ("know", "knew"),
    ("throw", "threw"), ("speak", "spoke"), ("break", "broke"), ("choose", "chose"),
    ("drive", "drove"), ("ride", "rode"), ("rise", "rose"), ("begin", "began"),
    ("drink", "drank"), ("ring", "rang"), ("sit", "sat"), ("stand", "stood"),
    ("feel", "felt"), ("keep", "kept"), ("sleep", "slept"), ("leave", "left"),
    ("meet", "met"), ("find", "found"), ("hold", "held"), ("tell", "told"),
    ("make", "made"), ("pay", "paid"), ("say", "said"), ("build", "built"),
    ("send", "sent"), ("spend", "spent"), ("jump", "jumped"), ("play", "played"),
    ("talk", "talked"), ("cook", "cooked"), ("open", "opened"), ("help", "helped"),
    ("call", "called"), ("ask", "asked"), ("work", "worked"), ("live", "lived"),
    ("move", "moved"), ("dance", "danced"), ("love", "loved"), ("push", "pushed"),
    ("pull", "pulled"), ("climb", "climbed"), ("laugh", "laughed"), ("cry", "cried"),
    ("try", "tried"), ("study", "studied"), ("carry", "carried"), ("watch", "watched"),
    ("wash", "washed"), ("fall", "fell"), ("forget", "forgot"), ("get", "got"),
    ("come", "came"), ("wear", "wore"), ("bite", "bit"), ("hide", "hid"),
    ("shake", "shook"), ("steal", "stole"), ("freeze", "froze"), ("wake", "woke"),
]

SINGULAR_PLURAL: list[tuple[str, str]] = [
    ("cat", "cats"), ("dog", "dogs"), ("apple", "apples"), ("book", "books"),
    ("car", "cars"), ("tree", "trees"), ("house", "houses"), ("bird", "birds"),
    ("key", "keys"), ("cabinet", "cabinets"), ("table", "tables"), ("chair", "chairs"),
    ("door", "doors"), ("window", "windows"), ("river", "rivers"), ("mountain", "mountains"),
    ("flower", "flowers"), ("horse", "horses"), ("cow", "cows"), ("pig", "pigs"),
    ("girl", "girls"), ("boy", "boys"), ("king", "kings"), ("queen", "queens"),
    ("teacher", "teachers"), ("student", "students"), ("doctor", "doctors"),
    ("farmer", "farmers"), ("pilot", "pilots"), ("writer", "writers"), ("singer", "singers"),
    ("painter", "painters"), ("bottle", "bottles"), ("cup", "cups"), ("plate", "plates"),
    ("spoon", "spoons"), ("shoe", "shoes"), ("hat", "hats"), ("coat", "coats"),
    ("bag", "bags"), ("ball", "balls"), ("ship", "ships"), ("boat", "boats"),
    ("train", "trains"), ("road", "roads"), ("bridge", "bridges"), ("tower", "towers"),
    ("garden", "gardens"), ("school", "schools"), ("lake", "lakes"), ("star", "stars"),
    ("cloud", "clouds"), ("egg", "eggs"), ("shirt", "shirts"), ("song", "songs"),
    ("lamp", "lamps"), ("pen", "pens"), ("desk", "desks"), ("wall", "walls"),
    ("room", "rooms"), ("hand", "hands"), ("child", "children"), ("mouse", "mice"),
    ("man", "men"), ("woman", "women"), ("foot", "feet"), ("tooth", "teeth"),
    ("goose", "geese"), ("person", "people"), ("box", "boxes"), ("bus", "buses"),
    ("dish", "dishes"), ("church", "churches"), ("glass", "glasses"), ("baby", "babies"),
    ("city", "cities"), ("party", "parties"), ("lady", "ladies"), ("story", "stories"),
    ("knife", "knives"), ("leaf", "leaves"), ("wolf", "wolves"), ("wife", "wives"),
]

COUNTRY_CAPITAL: list[tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Brazil", "Brasilia"), ("Cuba", "Havana"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"), ("Tunisia", "Tunis"),
    ("Algeria", "Algiers"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"),
    ("Lebanon", "Beirut"), ("Jordan", "Amman"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Australia", "Canberra"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Czechia", "Prague"),
    ("Slovakia", "Bratislava"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Estonia", "Tallinn"), ("Iceland", "Reykjavik"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"),
    ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Senegal", "Dakar"),
    ("Mali", "Bamako"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Zambia", "Lusaka"), ("Angola", "Luanda"), ("Sudan", "Khartoum"), ("Libya", "Tripoli"),
    ("Qatar", "Doha"), ("Oman", "Muscat"),
]

LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Agreement sentences: "the <subject> <preposition> the <distractor> <verb>".
# Verb pairs are (singular, plural).
AGREEMENT_VERBS: list[tuple[str, str]] = [("is", "are"), ("was", "were"), ("has", "have")]
AGREEMENT_PREPOSITIONS: list[str] = ["near", "behind", "beside", "under", "with", "by"]
# Optional adjectives before a noun, so the subject does not sit at a fixed position.
AGREEMENT_ADJECTIVES: list[str] = ["old", "new", "red", "big", "small"]
# Completions after the verb, so training sentences are whole sentences.
AGREEMENT_COMPLETIONS: dict[str, list[str]] = {
    "is": ["old", "new", "red", "here", "there", "small", "big", "gone"],
    "was": ["old", "new", "red", "here", "there", "small", "big", "gone"],
    "has": ["fallen", "gone", "moved", "changed", "won", "left"],
}
