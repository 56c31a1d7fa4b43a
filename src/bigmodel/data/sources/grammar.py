"""A synthetic English -> German corpus drawn from a seeded grammar with German agreement rules.

Its sentences are about quantities, prices, dates, clock times and where things stand, with the
rules a model must learn: gender/number agreement of articles and adjectives, German number
words (units before tens: 21 -> "einundzwanzig"), "half past three" -> "halb vier", verb-final
subordinate clauses with separable verbs ("dass der Zug um halb vier abfährt"), "liegt" or
"steht" chosen by the object. Millions of distinct sentences, so a model cannot memorise its way
through.
"""

from __future__ import annotations

import random

from bigmodel.errors import UserError

EN_UNITS = [
    "",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
DE_UNITS = [
    "",
    "eins",
    "zwei",
    "drei",
    "vier",
    "fünf",
    "sechs",
    "sieben",
    "acht",
    "neun",
    "zehn",
    "elf",
    "zwölf",
    "dreizehn",
    "vierzehn",
    "fünfzehn",
    "sechzehn",
    "siebzehn",
    "achtzehn",
    "neunzehn",
]
DE_TENS = [
    "",
    "",
    "zwanzig",
    "dreißig",
    "vierzig",
    "fünfzig",
    "sechzig",
    "siebzig",
    "achtzig",
    "neunzig",
]
MONTHS = [
    ("January", "Januar"),
    ("February", "Februar"),
    ("March", "März"),
    ("April", "April"),
    ("May", "Mai"),
    ("June", "Juni"),
    ("July", "Juli"),
    ("August", "August"),
    ("September", "September"),
    ("October", "Oktober"),
    ("November", "November"),
    ("December", "Dezember"),
]

# English noun, plural; German noun, plural, gender; how it rests on a surface (liegt / steht).
NOUNS = [
    ("apple", "apples", "Apfel", "Äpfel", "m", "liegt"),
    ("book", "books", "Buch", "Bücher", "n", "liegt"),
    ("bottle", "bottles", "Flasche", "Flaschen", "f", "steht"),
    ("cup", "cups", "Tasse", "Tassen", "f", "steht"),
    ("glass", "glasses", "Glas", "Gläser", "n", "steht"),
    ("key", "keys", "Schlüssel", "Schlüssel", "m", "liegt"),
    ("letter", "letters", "Brief", "Briefe", "m", "liegt"),
    ("lamp", "lamps", "Lampe", "Lampen", "f", "steht"),
    ("pen", "pens", "Stift", "Stifte", "m", "liegt"),
    ("pear", "pears", "Birne", "Birnen", "f", "liegt"),
    ("egg", "eggs", "Ei", "Eier", "n", "liegt"),
    ("vase", "vases", "Vase", "Vasen", "f", "steht"),
    ("card", "cards", "Karte", "Karten", "f", "liegt"),
    ("candle", "candles", "Kerze", "Kerzen", "f", "steht"),
    ("jug", "jugs", "Krug", "Krüge", "m", "steht"),
    ("phone", "phones", "Telefon", "Telefone", "n", "liegt"),
]
ADJECTIVES = [
    ("small", "klein"),
    ("big", "groß"),
    ("red", "rot"),
    ("green", "grün"),
    ("old", "alt"),
    ("new", "neu"),
    ("blue", "blau"),
    ("cheap", "billig"),
    ("heavy", "schwer"),
    ("white", "weiß"),
]
# English place; German place and gender (dative after "auf": dem / der).
PLACES = [
    ("table", "Tisch", "m"),
    ("shelf", "Regal", "n"),
    ("bench", "Bank", "f"),
    ("floor", "Boden", "m"),
    ("windowsill", "Fensterbank", "f"),
    ("desk", "Schreibtisch", "m"),
    ("chair", "Stuhl", "m"),
    ("cupboard", "Schrank", "m"),
]
# English subject, English 3rd-person-singular?; German subject, person key for conjugation.
SUBJECTS = [
    ("I", False, "ich", "1s"),
    ("you", False, "du", "2s"),
    ("he", True, "er", "3s"),
    ("she", True, "sie", "3s"),
    ("we", False, "wir", "1p"),
    ("they", False, "sie", "3p"),
    ("my brother", True, "mein Bruder", "3s"),
    ("my sister", True, "meine Schwester", "3s"),
    ("the teacher", True, "der Lehrer", "3s"),
    ("our neighbours", False, "unsere Nachbarn", "3p"),
    ("my parents", False, "meine Eltern", "3p"),
]
# English verb (base, 3sg); German forms by person key.
VERBS = [
    ("buy", "buys", {"1s": "kaufe", "2s": "kaufst", "3s": "kauft", "1p": "kaufen", "3p": "kaufen"}),
    (
        "need",
        "needs",
        {"1s": "brauche", "2s": "brauchst", "3s": "braucht", "1p": "brauchen", "3p": "brauchen"},
    ),
    (
        "sell",
        "sells",
        {
            "1s": "verkaufe",
            "2s": "verkaufst",
            "3s": "verkauft",
            "1p": "verkaufen",
            "3p": "verkaufen",
        },
    ),
    ("see", "sees", {"1s": "sehe", "2s": "siehst", "3s": "sieht", "1p": "sehen", "3p": "sehen"}),
    ("have", "has", {"1s": "habe", "2s": "hast", "3s": "hat", "1p": "haben", "3p": "haben"}),
    (
        "find",
        "finds",
        {"1s": "finde", "2s": "findest", "3s": "findet", "1p": "finden", "3p": "finden"},
    ),
]
# Separable German verbs for arrivals: prefix goes to the end, or joins the verb in a clause.
ARRIVE = (
    "arrive",
    "arrives",
    {"1s": "komme", "2s": "kommst", "3s": "kommt", "1p": "kommen", "3p": "kommen"},
    "an",
)
# English event subject; German subject and verb (prefix of a separable verb, or "").
EVENTS = [
    ("the train leaves", "der Zug fährt", "ab"),
    ("the bus leaves", "der Bus fährt", "ab"),
    ("the film starts", "der Film fängt", "an"),
    ("the class starts", "der Unterricht fängt", "an"),
    ("the shop opens", "der Laden macht", "auf"),
    ("the meeting begins", "das Treffen beginnt", ""),
    ("the concert ends", "das Konzert endet", ""),
    ("the ferry arrives", "die Fähre kommt", "an"),
]
# Reporting verbs that open a "that" clause: English (base, 3sg); German by person key.
REPORTS = [
    ("say", "says", {"1s": "sage", "2s": "sagst", "3s": "sagt", "1p": "sagen", "3p": "sagen"}),
    (
        "think",
        "thinks",
        {"1s": "denke", "2s": "denkst", "3s": "denkt", "1p": "denken", "3p": "denken"},
    ),
    ("know", "knows", {"1s": "weiß", "2s": "weißt", "3s": "weiß", "1p": "wissen", "3p": "wissen"}),
]
CURRENCIES = [("euro", "euros", "Euro"), ("dollar", "dollars", "Dollar")]


def en_number(n: int) -> str:
    """1..99 in English words: 21 -> "twenty-one"."""
    if n < 20:
        return EN_UNITS[n]
    tens, unit = divmod(n, 10)
    return EN_TENS[tens] + (f"-{EN_UNITS[unit]}" if unit else "")


def de_number(n: int) -> str:
    """1..99 in German words, units before tens: 21 -> "einundzwanzig", 1 -> "eins"."""
    if n < 20:
        return DE_UNITS[n]
    tens, unit = divmod(n, 10)
    if not unit:
        return DE_TENS[tens]
    return ("ein" if unit == 1 else DE_UNITS[unit]) + "und" + DE_TENS[tens]


def _adj_ending(case: str, gender: str, plural: bool, article: str) -> str:
    """German adjective ending after `article` ("def", "indef" or "none")."""
    if plural:
        return "en" if article == "def" else "e"
    if article == "def":
        return "en" if case == "dat" or (case == "acc" and gender == "m") else "e"
    if article == "indef":  # mixed declension: einen kleinen / eine kleine / ein kleines
        return {"m": "en" if case == "acc" else "er", "f": "e", "n": "es"}[gender]
    return {"m": "en", "f": "e", "n": "es"}[gender]


def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


class SyntheticTranslation:
    """English -> German sentence pairs drawn from a small grammar with German agreement rules.

    Every template yields a (main clause) pair; with probability `p_clause` it is embedded in a
    "<subject> says that ..." clause, which moves the German verb (and a separable prefix) to the
    end of the clause.
    """

    def __init__(self, seed: int = 0, p_clause: float = 0.3) -> None:
        self.rng = random.Random(seed)
        self.p_clause = p_clause

    # ------------------------------------------------------------------- noun phrases
    def _quantity(self, n: int, noun, adj, case: str) -> tuple[str, str]:
        """n (adjective) nouns, as an object (acc) or subject (nom) without a definite article."""
        en_sg, en_pl, de_sg, de_pl, g, _ = noun
        en = en_number(n) if n > 1 else ("an" if (adj or noun)[0][0] in "aeiou" else "a")
        en += f" {adj[0]}" if adj else ""
        en += f" {en_pl if n > 1 else en_sg}"
        if n == 1:
            art = {"m": "einen" if case == "acc" else "ein", "f": "eine", "n": "ein"}[g]
            de = art + (f" {adj[1]}{_adj_ending(case, g, False, 'indef')}" if adj else "")
            de += f" {de_sg}"
        else:
            de = de_number(n) + (f" {adj[1]}{_adj_ending(case, g, True, 'none')}" if adj else "")
            de += f" {de_pl}"
        return en, de

    def _definite(self, noun, adj, n: int, case: str) -> tuple[str, str]:
        """the (n) (adjective) noun(s): der kleine Apfel, die drei roten Tassen."""
        en_sg, en_pl, de_sg, de_pl, g, _ = noun
        plural = n > 1
        en = "the" + (f" {en_number(n)}" if plural else "") + (f" {adj[0]}" if adj else "")
        en += f" {en_pl if plural else en_sg}"
        if plural:
            art = {"nom": "die", "acc": "die", "dat": "den"}[case]
        else:
            art = {
                ("nom", "m"): "der",
                ("acc", "m"): "den",
                ("dat", "m"): "dem",
                ("dat", "f"): "der",
                ("dat", "n"): "dem",
            }.get((case, g), {"m": "der", "f": "die", "n": "das"}[g])
        de = art + (f" {de_number(n)}" if plural else "")
        de += f" {adj[1]}{_adj_ending(case, g, plural, 'def')}" if adj else ""
        de += f" {de_pl if plural else de_sg}"
        return en, de

    def _count(self) -> int:
        r = self.rng.random()  # one thing often, small counts more than large ones
        return 1 if r < 0.3 else self.rng.randint(2, 12) if r < 0.65 else self.rng.randint(13, 99)

    # -------------------------------------------------------------- clause templates
    # Each returns (English clause, German main clause words before/after the verb slot as
    # (subject, verb, rest, prefix)) so a "that" clause can move the verb to the end.
    def buy(self):
        s_en, s3, s_de, p = self.rng.choice(SUBJECTS)
        base, third, forms = self.rng.choice(VERBS)
        adj = self.rng.choice(ADJECTIVES) if self.rng.random() < 0.6 else None
        obj_en, obj_de = self._quantity(self._count(), self.rng.choice(NOUNS), adj, "acc")
        return f"{s_en} {third if s3 else base} {obj_en}", (s_de, forms[p], obj_de, "")

    def place(self):
        noun = self.rng.choice(NOUNS)
        adj = self.rng.choice(ADJECTIVES) if self.rng.random() < 0.5 else None
        n = 1 if self.rng.random() < 0.6 else self.rng.randint(2, 12)
        subj_en, subj_de = self._definite(noun, adj, n, "nom")
        pl_en, pl_de, pl_g = self.rng.choice(PLACES)
        verb = noun[5] if n == 1 else {"liegt": "liegen", "steht": "stehen"}[noun[5]]
        where = f"auf {'der' if pl_g == 'f' else 'dem'} {pl_de}"
        return f"{subj_en} {'is' if n == 1 else 'are'} on the {pl_en}", (subj_de, verb, where, "")

    def price(self):
        noun = self.rng.choice(NOUNS)
        n = 1 if self.rng.random() < 0.6 else self.rng.randint(2, 12)
        subj_en, subj_de = self._definite(noun, None, n, "nom")
        sg, pl, de_cur = self.rng.choice(CURRENCIES)
        whole = self.rng.randint(1, 99)
        cents = self.rng.choice([0, 0, 10, 20, 25, 50, 75, 90, 95, 99])
        if cents:
            en_amount, de_amount = f"{whole}.{cents:02d} {pl}", f"{whole},{cents:02d} {de_cur}"
        elif whole == 1:
            en_amount, de_amount = f"one {sg}", f"einen {de_cur}"
        else:
            en_amount, de_amount = f"{en_number(whole)} {pl}", f"{de_number(whole)} {de_cur}"
        en_verb, de_verb = ("costs", "kostet") if n == 1 else ("cost", "kosten")
        return f"{subj_en} {en_verb} {en_amount}", (subj_de, de_verb, de_amount, "")

    def arrive(self):
        s_en, s3, s_de, p = self.rng.choice(SUBJECTS)
        base, third, forms, prefix = ARRIVE
        month_en, month_de = self.rng.choice(MONTHS)
        day = self.rng.randint(1, 28)
        en_date, de_date = f"on {month_en} {day}", f"am {day}. {month_de}"
        if self.rng.random() < 0.4:
            year = self.rng.randint(1990, 2030)
            en_date, de_date = f"{en_date}, {year}", f"{de_date} {year}"
        return f"{s_en} {third if s3 else base} {en_date}", (s_de, forms[p], de_date, prefix)

    def clock(self):
        ev_en, ev_de, prefix = self.rng.choice(EVENTS)
        subj_de, verb = ev_de.rsplit(" ", 1)
        h = self.rng.randint(1, 12)
        kind = self.rng.randrange(4)
        nxt = h % 12 + 1
        if kind == 0:
            en, de = f"at {en_number(h)} o'clock", f"um {'ein' if h == 1 else de_number(h)} Uhr"
        elif kind == 1:
            en, de = f"at half past {en_number(h)}", f"um halb {de_number(nxt)}"
        elif kind == 2:
            en, de = f"at quarter past {en_number(h)}", f"um Viertel nach {de_number(h)}"
        else:
            en, de = f"at quarter to {en_number(nxt)}", f"um Viertel vor {de_number(nxt)}"
        return f"{ev_en} {en}", (subj_de, verb, de, prefix)

    # ------------------------------------------------------------------------ sentences
    def pair(self) -> tuple[str, str]:
        template = self.rng.choice(
            [self.buy, self.buy, self.place, self.price, self.arrive, self.clock]
        )
        en, (subj, verb, rest, prefix) = template()
        if self.rng.random() < self.p_clause:
            s_en, s3, s_de, p = self.rng.choice(SUBJECTS)
            base, third, forms = self.rng.choice(REPORTS)
            en = f"{s_en} {third if s3 else base} that {en}"
            de = f"{s_de} {forms[p]}, dass {subj} {rest} {prefix}{verb}"
        else:
            de = f"{subj} {verb} {rest}" + (f" {prefix}" if prefix else "")
        return _capitalize(en) + ".", _capitalize(de) + "."

    def pairs(self, n: int, exclude: set[str] | None = None) -> list[tuple[str, str]]:
        """n distinct pairs whose English side is not in `exclude` (so splits never overlap)."""
        seen = set(exclude or ())
        out: list[tuple[str, str]] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise UserError(
                    f"the synthetic corpus cannot supply {n} distinct sentences; "
                    "ask for fewer with data.num_train / num_val / num_test"
                )
            en, de = self.pair()
            if en not in seen:
                seen.add(en)
                out.append((en, de))
        return out


def synthetic_corpus(num_train: int, num_val: int, num_test: int, seed: int = 0):
    """{split: [(english, german), ...]}; test and val sentences never occur in train."""
    gen = SyntheticTranslation(seed)
    test = gen.pairs(num_test)
    val = gen.pairs(num_val, exclude={en for en, _ in test})
    train = gen.pairs(num_train, exclude={en for en, _ in test + val})
    return {"train": train, "val": val, "test": test}
