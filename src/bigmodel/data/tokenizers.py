"""Tokenizers that round-trip through plain data, so they live in checkpoints and run folders."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bigmodel.errors import UserError


class CharTokenizer:
    """One id per distinct character of the training text (nanoGPT's shakespeare_char).

    Trained tokenizers reserve one more id for `UNK`, U+FFFD (the Unicode replacement character):
    characters the training text lacks, such as ones that occur only in the validation or test
    split, encode as that id, so every split tokenizes and every character is scored. A tokenizer
    without `unk` (checkpoints from before it existed) refuses unknown characters.
    """

    UNK = "\ufffd"

    def __init__(self, chars: str, unk: str | None = None) -> None:
        if unk is not None and unk not in chars:
            raise ValueError(f"the unknown character {unk!r} must be one of the chars")
        self.chars, self.unk = chars, unk
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.unk_id = None if unk is None else self.stoi[unk]
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The characters of `text` (the training split), sorted, plus `UNK`."""
        return cls("".join(sorted(set(text) | {cls.UNK})), unk=cls.UNK)

    def unknown(self, text: str) -> set[str]:
        """The characters of `text` outside the vocabulary."""
        return set(text).difference(self.stoi)

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Ids of `text`; unknown characters become `unk_id`, or an error when `strict` (prompts:
        a model cannot read what it never saw) or when there is no `unk`."""
        if self.unk_id is not None and not strict:
            get, unk = self.stoi.get, self.unk_id
            return [get(c, unk) for c in text]
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in the character vocabulary of this model; "
                f"its {len(self.chars)} characters are those of the corpus it was trained on; use "
                "those, or train with data.tokenizer=bpe (any text)"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        state = {"type": "char", "chars": self.chars}
        if self.unk is not None:  # absent: the dict of an older tokenizer stays as it was
            state["unk"] = self.unk
        return state


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained with HF `tokenizers`: any text encodes, no unknowns."""

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special_tokens or [],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_folder(cls, folder: str | Path) -> BPETokenizer:
        """A pretrained tokenizer saved in the Hugging Face layout: `tokenizer.json`, or GPT-2's
        `vocab.json` + `merges.txt` (byte-level BPE)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(
                f"the tokenizer folder {folder} does not exist; point data.tokenizer (or "
                "model.init_from) at the pretrained model's folder"
            )
        if (folder / "tokenizer.json").is_file():
            try:
                return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
            except Exception as e:
                raise UserError(
                    f"{folder / 'tokenizer.json'} is not a tokenizer HF tokenizers can read "
                    f"({str(e).splitlines()[0][:200]}); replace it with the model's own file"
                ) from None
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise UserError(
                f"{folder} holds no tokenizer: give it tokenizer.json, or vocab.json and "
                "merges.txt, as saved with the model"
            )
        try:
            tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise UserError(
                f"cannot read the tokenizer {vocab} + {merges} ({str(e).splitlines()[0][:200]}); "
                "replace them with the model's own files"
            ) from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def to_dict(self) -> dict:
        return {"type": "bpe", "json": self.tok.to_str()}


class TokenizerPair:
    """Source and target tokenizers of a translation model (one object twice when shared).

    `encode` is the source side (ids end in eos), `decode` the target side (specials dropped),
    so translation data and decoding agree on one convention. Both sides hold `PAD`, `BOS`, `EOS`
    as special tokens with the same ids.
    """

    PAD, BOS, EOS = "<pad>", "<s>", "</s>"
    SPECIALS = [PAD, BOS, EOS]

    def __init__(self, src: BPETokenizer, tgt: BPETokenizer | None = None) -> None:
        self.src, self.tgt = src, tgt or src
        self.shared = tgt is None or tgt is src
        ids = [[t.token_to_id(s) for s in self.SPECIALS] for t in (self.src, self.tgt)]
        if ids[0] != ids[1] or None in ids[0]:
            raise UserError(
                f"translation tokenizers need the specials {self.SPECIALS} at the same "
                f"ids on both sides (got {ids}); train them with TokenizerPair.train"
            )
        self.pad_id, self.bos_id, self.eos_id = ids[0]
        self.vocab_size = self.tgt.vocab_size

    @classmethod
    def train(
        cls, src_texts: list[str], tgt_texts: list[str], vocab_size: int, shared: bool = True
    ) -> TokenizerPair:
        if shared:
            return cls(BPETokenizer.train(src_texts + tgt_texts, vocab_size, cls.SPECIALS))
        return cls(
            BPETokenizer.train(src_texts, vocab_size, cls.SPECIALS),
            BPETokenizer.train(tgt_texts, vocab_size, cls.SPECIALS),
        )

    def encode(self, text: str) -> list[int]:
        return self.src.encode(text) + [self.eos_id]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [ids + [self.eos_id] for ids in self.src.encode_batch(texts)]

    def encode_target_batch(self, texts: list[str]) -> list[list[int]]:
        """bos + ids + eos: the decoder reads [:-1] and predicts [1:]."""
        return [[self.bos_id, *ids, self.eos_id] for ids in self.tgt.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tgt.decode(ids)  # HF tokenizers skip special tokens when decoding

    def to_dict(self) -> dict:
        state = {"type": "pair", "src": self.src.to_dict()}
        if not self.shared:
            state["tgt"] = self.tgt.to_dict()
        return state


def tokenizer_from_dict(state: dict) -> CharTokenizer | BPETokenizer | TokenizerPair:
    kind = state.get("type")
    if kind == "char":
        return CharTokenizer(state["chars"], state.get("unk"))
    if kind == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(state["json"]))
    if kind == "pair":
        tgt = tokenizer_from_dict(state["tgt"]) if "tgt" in state else None
        return TokenizerPair(tokenizer_from_dict(state["src"]), tgt)
    raise UserError(
        f"unknown tokenizer type {kind!r} in checkpoint; expected 'char', 'bpe' or 'pair'"
    )
