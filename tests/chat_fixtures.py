"""Small Hugging Face chat models and conversation files for the post-training tests: a random
decoder of a supported family saved by transformers, with a byte-level BPE tokenizer that has
ChatML's special tokens and a chat template (`PreTrainedTokenizerFast(chat_template=...)`), and
generated instruction and preference rows. Nothing is downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tests.test_pretrained import corpus

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the same text, with the assistant's part marked for transformers' return_assistant_tokens_mask
CHATML_MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=False)),
}


def chat_tokenizer(vocab: int = 300, template: str | None = CHATML):
    """A byte-level BPE with <|im_start|>, <|im_end|> and <|endoftext|> as special tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(20_000).splitlines(), trainer)
    kwargs = {"chat_template": template} if template else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **kwargs,
    )


def write_chat_model(
    folder: Path,
    family: str = "llama",
    template: str | None = CHATML,
    seed: int = 0,
    sizes: dict | None = None,
) -> Path:
    """A random `family` model with a chat tokenizer, saved by transformers in `folder`
    (`sizes`: its config's sizes, if not the tiny SIZES)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tok = chat_tokenizer(template=template)
    tok.save_pretrained(folder)
    cls, settings = CONFIGS[family]
    config = getattr(transformers, cls)(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **(sizes or SIZES),
        **settings,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # every tensor random, norms too, so that a mapping mistake shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(folder)
    return folder


WORDS = [
    "apple",
    "river",
    "stone",
    "light",
    "garden",
    "window",
    "paper",
    "music",
    "orange",
    "silver",
    "table",
    "cloud",
]


def instruction(rng: random.Random) -> tuple[str, str]:
    """A generated instruction and its one right answer: reverse a word, or add two numbers."""
    if rng.random() < 0.5:
        w = rng.choice(WORDS)
        return f"Reverse the word {w}.", w[::-1]
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"What is {a} plus {b}?", str(a + b)


def write_chat_rows(path: Path, n: int = 40, seed: int = 0, alpaca_every: int = 4) -> Path:
    """n rows: OpenAI messages (some with a system turn, some of two exchanges) and, every
    `alpaca_every`-th row, an Alpaca instruction/input/output row."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, a = instruction(rng)
        if alpaca_every and i % alpaca_every == alpaca_every - 1:
            rows.append({"instruction": q, "input": "", "output": a})
            continue
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer briefly."})
        if i % 5 == 0:
            q2, a2 = instruction(rng)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_preference_rows(path: Path, n: int = 40, seed: int = 0) -> Path:
    """n rows {prompt, chosen, rejected}: the right answer chosen, a wrong one rejected."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = instruction(rng)
        wrong = a[::-1] + "x" if not a.isdigit() else str(int(a) + rng.randint(1, 5))
        rows.append({"prompt": q, "chosen": a, "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
