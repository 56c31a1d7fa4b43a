"""Parallel text for translation: sources, BPE tokenizers, length filtering, bucketed batches.

Three sources, one batch format:
- `synthetic`: an embedded English -> German corpus generated from a seed (below). Its sentences
  are about quantities, prices, dates, clock times and where things stand, with the rules a model
  must learn: gender/number agreement of articles and adjectives, German number words (units
  before tens: 21 -> "einundzwanzig"), "half past three" -> "halb vier", verb-final subordinate
  clauses with separable verbs ("dass der Zug um halb vier abfährt"), "liegt" or "steht" chosen
  by the object. Millions of distinct sentences, so the model cannot memorise its way through.
- `files`: `{train,val,test}.<lang>` plain-text files (optionally `.gz`), one sentence per line.
- `hf`: HF datasets parquet/json files with a `translation` column of `{lang: text}` dicts, the
  layout of the common WMT copies (`train-*.parquet`, `validation-*.parquet`, `test-*.parquet`).

A batch is a dict: `src` (B, S) source ids ending in eos, `tgt` (B, T) bos + target ids + eos,
both right-padded with pad; `src_text` and `tgt_text` are the raw sentences (BLEU references).
"""

from __future__ import annotations

import gzip
import logging
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from bigmodel.data.resumable import ResumableLoader, eval_loader, loader_kwargs, train_loader
from bigmodel.data.tokenizers import TokenizerPair, tokenizer_from_dict
from bigmodel.errors import UserError

log = logging.getLogger("bigmodel")

SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "files", "hf")
# Names the split files of HF datasets copies use, per split of ours.
HF_SPLIT_NAMES = {
    "train": ("train",),
    "val": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}
HF_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}

# ===================================================================== the synthetic corpus
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


# ============================================================================ file sources
def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def read_parallel_files(root: str, src: str, tgt: str) -> dict[str, list[tuple[str, str]]]:
    """{split: [(source, target), ...]} from `{split}.{lang}` or `{split}.{lang}.gz` under root."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; point it at the folder holding "
            f"train.{src}, train.{tgt}, val.{src}, ... (plain or .gz)"
        )
    out = {}
    for split in SPLITS:
        files = []
        for lang in (src, tgt):
            names = (f"{split}.{lang}", f"{split}.{lang}.gz")
            found = [base / n for n in names if (base / n).is_file()]
            if not found:
                raise UserError(
                    f"{base} has no {split}.{lang} (or {split}.{lang}.gz); parallel data needs "
                    f"{{train,val,test}}.{{{src},{tgt}}} files, one sentence a line"
                )
            files.append(found[0])
        src_lines, tgt_lines = (_read_lines(f) for f in files)
        if len(src_lines) != len(tgt_lines):
            raise UserError(
                f"{files[0]} has {len(src_lines)} lines but {files[1]} has {len(tgt_lines)}; "
                "parallel files must be line-aligned (line i of one translates line i of the other)"
            )
        out[split] = list(zip(src_lines, tgt_lines, strict=True))
    return out


def _hf_files(base: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in HF_SUFFIXES)
    out: dict[str, list[Path]] = {}
    for split, names in HF_SPLIT_NAMES.items():
        out[split] = [p for p in files if any(p.name.startswith(n) for n in names)]
    return out


def read_hf_translation(root: str, src: str, tgt: str, column: str = "translation"):
    """{split: [(source, target), ...]} from HF parquet/json files of `{lang: text}` dicts.

    root is a folder holding `train*`, `validation*` (or `val*`, `dev*`) and `test*` files, as the
    WMT copies on the HF hub lay them out (`de-en/train-00000-of-00003.parquet`).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UserError("data.source=hf needs HF datasets: pip install -e '.[hf]'") from e
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"data.root={root} is not a folder; point it at the folder of "
            "train*/validation*/test* parquet or json files"
        )
    found = _hf_files(base)
    out = {}
    for split, files in found.items():
        if not files:
            raise UserError(
                f"{base} has no {split} files (looked for names starting with "
                f"{', '.join(HF_SPLIT_NAMES[split])} ending in .parquet/.json/.jsonl)"
            )
        fmt = HF_SUFFIXES[files[0].suffix]
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
        if column not in ds.column_names:
            raise UserError(
                f"{files[0]} has no column {column!r} (columns: {ds.column_names}); "
                "set data.translation_column to the column of {lang: text} dicts"
            )
        rows = ds[column]
        for lang in (src, tgt):
            if rows and lang not in rows[0]:
                raise UserError(
                    f"{files[0]} translates {sorted(rows[0])}, not {lang!r}; set "
                    f"data.src and data.tgt to two of {sorted(rows[0])}"
                )
        out[split] = [(r[src], r[tgt]) for r in rows]
    return out


# ================================================================================= batches
def length_buckets(
    lengths: list[int], batch_size: int, seed: int, pool: int = 100
) -> list[list[int]]:
    """Batches of indices of similar length: shuffle, sort within pools of `pool` batches, cut.

    Padding shrinks to a few tokens a batch while the batches still mix the whole corpus.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    span = batch_size * pool
    batches = []
    for i in range(0, len(order), span):
        chunk = sorted(order[i : i + span], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return batches


def pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class PairBatches(Dataset):
    """Item i is a whole batch (a dict, see the module docstring), built from pre-encoded pairs.

    Making batches the items lets Lightning shard them over devices with its DistributedSampler.
    """

    def __init__(self, pairs, src_ids, tgt_ids, batches: list[list[int]], pad_id: int) -> None:
        self.pairs, self.src_ids, self.tgt_ids = pairs, src_ids, tgt_ids
        self.batches, self.pad_id = batches, pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        idx = self.batches[i]
        return {
            "src": pad([self.src_ids[j] for j in idx], self.pad_id),  # (B, S)
            "tgt": pad([self.tgt_ids[j] for j in idx], self.pad_id),  # (B, T)
            "src_text": [self.pairs[j][0] for j in idx],
            "tgt_text": [self.pairs[j][1] for j in idx],
        }


class TranslationDataModule(L.LightningDataModule):
    """Parallel sentences -> BPE ids -> length-bucketed batches of (source, target).

    Args:
        source: synthetic (embedded), files ({split}.{lang}[.gz] under root) or hf (parquet/json).
        root: folder of the files / hf source.
        src, tgt: language codes; the synthetic corpus is en <-> de, either direction.
        shared_vocab: one BPE tokenizer for both sides (needed to share embeddings) or one each.
        vocab_size: BPE vocabulary size (of each tokenizer when separate).
        max_len: training pairs with more tokens than this on either side are dropped.
        max_eval_pairs: score at most this many val/test pairs (null = all).
        split: the split eval.py scores.
    """

    def __init__(
        self,
        source: str = "synthetic",
        root: str | None = None,
        src: str = "en",
        tgt: str = "de",
        translation_column: str = "translation",
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 1000,
        shared_vocab: bool = True,
        vocab_size: int = 1000,
        max_len: int = 128,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_eval_pairs: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        split: str = "test",
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"data.source={source} is not one of: {', '.join(SOURCES)}")
        if source != "synthetic" and not root:
            raise UserError(f"data.source={source} needs data.root=DIR, the folder of its files")
        if source == "synthetic" and {src, tgt} != {"en", "de"}:
            raise UserError(
                f"the synthetic corpus is English <-> German; data.src={src} "
                f"data.tgt={tgt} must be en and de (either order)"
            )
        if src == tgt:
            raise UserError(f"data.src and data.tgt are both {src!r}; give two languages")
        for name, v in (
            ("batch_size", batch_size),
            ("max_len", max_len),
            ("vocab_size", vocab_size),
        ):
            if v is None or v <= 0:
                raise UserError(f"data.{name} must be a positive integer, got {v}")
        if split not in SPLITS:
            raise UserError(f"data.split={split} is not one of {', '.join(SPLITS)}")
        self.source, self.root, self.src, self.tgt = source, root, src, tgt
        self.translation_column = translation_column
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.shared_vocab, self.vocab_size, self.max_len = shared_vocab, vocab_size, max_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_eval_pairs, self.num_workers = max_eval_pairs, num_workers
        self.pin_memory = pin_memory
        self.seed, self.split = seed, split
        self.tokenizer: TokenizerPair | None = None
        self.pairs: dict[str, list[tuple[str, str]]] = {}
        self.ids: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    # ---------------------------------------------------------------------------------- text
    def load_pairs(self) -> dict[str, list[tuple[str, str]]]:
        if self.source == "synthetic":
            corpus = synthetic_corpus(*(self.sizes[s] for s in SPLITS), seed=self.seed)
            if self.src == "de":
                corpus = {k: [(de, en) for en, de in v] for k, v in corpus.items()}
        elif self.source == "files":
            corpus = read_parallel_files(self.root, self.src, self.tgt)
        else:
            corpus = read_hf_translation(self.root, self.src, self.tgt, self.translation_column)
        out = {}
        for split, pairs in corpus.items():
            kept = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
            if len(kept) < len(pairs):
                log.info(f"{split}: dropped {len(pairs) - len(kept)} pairs with an empty side")
            if split != "train" and self.max_eval_pairs:
                kept = kept[: self.max_eval_pairs]
            if not kept:
                raise UserError(
                    f"the {split} split of data.source={self.source} holds no sentence "
                    "pairs; give it non-empty parallel text"
                )
            out[split] = kept
        return out

    # ----------------------------------------------------------------------------- lifecycle
    def setup(self, stage: str | None = None) -> None:
        if self.ids:  # idempotent: run.py sets up before building the model, Lightning again
            return
        self.pairs = self.load_pairs()
        if self.tokenizer is None:
            train = self.pairs["train"]
            self.tokenizer = TokenizerPair.train(
                [s for s, _ in train], [t for _, t in train], self.vocab_size, self.shared_vocab
            )
        for split, pairs in self.pairs.items():
            src_ids = self.tokenizer.encode_batch([s for s, _ in pairs])
            tgt_ids = self.tokenizer.encode_target_batch([t for _, t in pairs])
            if split == "train":  # length filter: long outliers cost memory and teach little
                keep = [
                    i
                    for i in range(len(pairs))
                    if len(src_ids[i]) <= self.max_len and len(tgt_ids[i]) <= self.max_len + 1
                ]
                if len(keep) < len(pairs):
                    log.info(
                        f"train: dropped {len(pairs) - len(keep)} pairs longer than "
                        f"data.max_len={self.max_len} tokens"
                    )
                if not keep:
                    raise UserError(
                        f"every training pair is longer than data.max_len="
                        f"{self.max_len} tokens; raise data.max_len"
                    )
                pairs = self.pairs[split] = [pairs[i] for i in keep]
                src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
            self.ids[split] = (src_ids, tgt_ids)

    @property
    def net_kwargs(self) -> dict:
        """What the net needs to know that only the data can tell."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() first: the vocabulary comes from the training text")
        t = self.tokenizer
        return {
            "src_vocab_size": t.src.vocab_size,
            "tgt_vocab_size": t.tgt.vocab_size,
            "pad_id": t.pad_id,
            "bos_id": t.bos_id,
            "eos_id": t.eos_id,
        }

    # --------------------------------------------------------------------------- dataloaders
    def _dataset(self, split: str, batch_size: int, seed: int) -> PairBatches:
        src_ids, tgt_ids = self.ids[split]
        lengths = [max(len(s), len(t)) for s, t in zip(src_ids, tgt_ids, strict=True)]
        batches = length_buckets(lengths, batch_size, seed)
        return PairBatches(self.pairs[split], src_ids, tgt_ids, batches, self.tokenizer.pad_id)

    def train_dataloader(self) -> ResumableLoader:
        ds = self._dataset("train", self.batch_size, self.seed)
        # Batches keep their members; their order is reshuffled every epoch (seeded).
        return train_loader(self, ds, shuffle=True, seed=self.seed, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.eval_batch_size, self.seed))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.split, self.eval_batch_size, self.seed))

    def _loader(self, ds: Dataset) -> DataLoader:
        return eval_loader(ds, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict:
        # batch_size None: the items are whole batches (PairBatches)
        return loader_kwargs(None, self.num_workers, self.pin_memory)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"tokenizer": self.tokenizer.to_dict()} if self.tokenizer else {}

    def load_state_dict(self, state: dict) -> None:
        if "tokenizer" in state:
            restored = tokenizer_from_dict(state["tokenizer"])
            if self.tokenizer is not None and self.tokenizer.to_dict() != restored.to_dict():
                raise UserError(
                    "the checkpoint's tokenizer differs from the one built from this data; "
                    "resume with the same data config the checkpoint was trained with"
                )
            self.tokenizer = restored
