"""Running a bundle: PyTorch (eager) or ONNX Runtime, one interface for predict.py and serve.py.

`Runner(bundle, engine)` gives what each kind of model does with a batch: class probabilities,
regression outputs, generated text, translations. `engine=auto` uses ONNX Runtime when the
bundle is an exported folder with ONNX graphs, PyTorch otherwise; `int8=true` picks the int8
graphs. Text generation samples from next-token logits the same way on both engines
(bigmodel.sampling).
"""

from __future__ import annotations

import numpy as np
import torch

from bigmodel.deploy.bundle import Bundle
from bigmodel.deploy.graphs import torch_graph
from bigmodel.deploy.inputs import BadInput
from bigmodel.deploy.onnx import run_session, session
from bigmodel.errors import UserError
from bigmodel.sampling import RowSampling, generate, generate_rows

ENGINES = ("auto", "torch", "onnx")


class Runner:
    """One model on one engine (see the module docstring)."""

    def __init__(
        self, bundle: Bundle, engine: str = "auto", int8: bool = False, device: str = "cpu"
    ) -> None:
        if engine not in ENGINES:
            raise UserError(f"engine={engine} is not one of {', '.join(ENGINES)}")
        self.bundle, self.kind, self.prep = bundle, bundle.kind, bundle.prep
        graphs = ["encoder", "decoder_step"] if self.kind == "seq2seq" else ["model"]
        suffix = ".int8.onnx" if int8 else ".onnx"
        have = all(f"{g}{suffix}" in bundle.onnx_files for g in graphs)
        if engine == "auto":
            engine = "onnx" if have else "torch"
        if engine == "onnx" and not have:
            where = bundle.folder or "a checkpoint"
            raise UserError(
                f"engine=onnx needs {', '.join(g + suffix for g in graphs)} in model_dir, and "
                f"{where} has none; export with format=onnx"
                + (" quantize=int8" if int8 else "")
                + " or use engine=torch"
            )
        if int8 and engine != "onnx":
            raise UserError("int8=true runs the int8 ONNX graphs: use engine=onnx or auto")
        self.engine = engine
        if engine == "onnx" and self.kind == "lm":  # cached decoding, where the folder has it
            steps = ["prefill", "decode_step"]
            if all(f"{g}{suffix}" in bundle.onnx_files for g in steps):
                graphs = graphs + steps
        self.sessions = (
            {g: session(bundle.folder / f"{g}{suffix}") for g in graphs} if engine == "onnx" else {}
        )
        self.module = torch_graph(bundle) if self.kind in ("image", "audio", "regression") else None
        self.device = torch.device(device if engine == "torch" else "cpu")
        if engine == "torch":
            bundle.net.to(self.device)
            if self.module is not None:
                self.module.to(self.device)

    def describe(self) -> str:
        return f"{self.kind} model on {'ONNX Runtime' if self.engine == 'onnx' else 'PyTorch'}"

    # ----------------------------------------------------------------- classifiers, regressors
    def forward(self, x: np.ndarray) -> np.ndarray:
        """A batch of prepared inputs (B, ...) -> the graph's output (B, K) or (B, D)."""
        if self.engine == "onnx":
            sess = self.sessions["model"]
            return run_session(sess, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            return self.module(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def classify(self, x: np.ndarray) -> np.ndarray:
        """(B, ...) -> class probabilities (B, K)."""
        return torch.softmax(torch.from_numpy(self.forward(x)).double(), -1).float().numpy()

    # ------------------------------------------------------------------------ language models
    def all_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits at every position (B, T, V)."""
        if self.engine == "onnx":
            return torch.from_numpy(run_session(self.sessions["model"], {"idx": idx.numpy()})[0])
        with torch.no_grad():
            return self.bundle.net(idx.to(self.device)).float().cpu()

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits of the last position (B, V)."""
        return self.all_logits(idx)[:, -1]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt -> ids; refused when a character is unknown or it exceeds the context."""
        from bigmodel.tasks.language_model import encode_prompt, start_token

        try:
            ids = (
                encode_prompt(self.bundle.tokenizer, prompt)
                if prompt
                else [start_token(self.bundle.tokenizer)]
            )
        except UserError as e:
            raise BadInput(str(e)) from None
        block = self.prep["block_size"]
        if len(ids) > block:
            raise BadInput(
                f"the prompt is {len(ids)} tokens long and this model's context is {block} "
                f"tokens; shorten the prompt to at most {block} tokens"
            )
        return ids

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int | None = None,
        stream=None,
    ) -> str:
        """Sample a continuation of `prompt` (returned with the prompt in front).

        temperature=0 decodes greedily; `stream(text)` is called with each new piece of text.
        """
        ids = self.encode_prompt(prompt)
        skip = 0 if prompt else 1
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        tok = self.bundle.tokenizer
        shown = tok.decode(ids[skip:])

        def show(idx: torch.Tensor) -> None:
            nonlocal shown
            text = tok.decode(idx[0, skip:].tolist())
            if len(text) > len(shown) and text.startswith(shown):
                stream(text[len(shown) :])
                shown = text

        net = self.bundle.net
        # PyTorch decodes from the net's key/value cache, ONNX Runtime from the prefill and
        # decode-step graphs' (an older folder without them runs the window each step)
        cached = self.engine != "onnx" and hasattr(net, "new_cache")
        if self.engine == "onnx" and "decode_step" in self.sessions:
            logits_of = OnnxCachedDecoder(self.sessions, self.all_logits)
        else:
            logits_of = net if cached else self.all_logits
        idx = generate(
            logits_of,
            torch.tensor([ids], dtype=torch.long, device=self.device if cached else "cpu"),
            max_new_tokens,
            self.prep["block_size"],
            temperature,
            top_k,
            g,
            on_token=show if stream is not None else None,
        )
        return tok.decode(idx[0, skip:].tolist())  # (1, T + n) ids, on any device

    def generate_many(self, requests: list[dict]) -> list[str | BadInput]:
        """Several requests ({prompt, max_new_tokens, temperature, top_k, seed}) -> each one's
        text, or the BadInput that refuses it, in order.

        On PyTorch they are decoded together from one key/value cache (one forward per step for
        the batch, bigmodel.sampling.generate_rows) when they fit the context; otherwise, and on
        ONNX Runtime, one after another. Each gives the text it would alone.
        """
        results: list[str | BadInput] = [BadInput("not decoded")] * len(requests)
        todo: list[tuple[int, list[int], dict]] = []
        for i, req in enumerate(requests):
            try:
                todo.append((i, self.encode_prompt(req["prompt"]), req))
            except BadInput as e:
                results[i] = e
        net, block = self.bundle.net, self.prep["block_size"]
        fits = (
            bool(todo)
            and max(len(ids) for _, ids, _ in todo)
            + max(req["max_new_tokens"] for _, _, req in todo)
            <= block
        )
        if len(todo) > 1 and fits and self.engine != "onnx" and hasattr(net, "new_cache"):
            rows = [
                RowSampling(r["max_new_tokens"], r["temperature"], r["top_k"], None, r["seed"])
                for _, _, r in todo
            ]
            new = generate_rows(net, [ids for _, ids, _ in todo], rows, block)
            for (i, ids, req), ids_new in zip(todo, new, strict=True):
                skip = 0 if req["prompt"] else 1  # an empty prompt: the start token, left out
                results[i] = self.bundle.tokenizer.decode((ids + ids_new)[skip:])
            return results
        for i, _, req in todo:
            try:
                results[i] = self.generate(
                    req["prompt"], req["max_new_tokens"], req["temperature"], req["top_k"],
                    req["seed"],
                )  # fmt: skip
            except BadInput as e:
                results[i] = e
        return results

    # -------------------------------------------------------------------------- translation
    def translate(self, texts: list[str], beam_size: int = 1) -> list[str]:
        """Sentences -> translations, in order (ONNX Runtime decodes greedily)."""
        tok, net = self.bundle.tokenizer, self.bundle.net
        cfg = net.config
        ids = tok.encode_batch(list(texts))
        src = torch.full((len(ids), max(map(len, ids))), cfg.pad_id, dtype=torch.long)
        for j, row in enumerate(ids):
            src[j, : len(row)] = torch.tensor(row)
        m = self.bundle.model
        ratio, offset = m.get("max_len_ratio", 1.5), m.get("max_len_offset", 10)
        if self.engine == "torch":
            with torch.no_grad():
                hyp = net.translate(
                    src.to(self.device),
                    beam_size=beam_size,
                    length_penalty=m.get("length_penalty", 1.0),
                    max_len_ratio=ratio,
                    max_len_offset=offset,
                )
        else:
            hyp = self._greedy_onnx(src, net.max_lengths(src, ratio, offset).cpu(), cfg)
        return [tok.decode(row) for row in hyp]

    def _greedy_onnx(self, src: torch.Tensor, max_lens: torch.Tensor, cfg) -> list[list[int]]:
        memory, mask = run_session(self.sessions["encoder"], {"src": src.numpy()})
        step = self.sessions["decoder_step"]
        B = src.shape[0]
        tgt = np.full((B, 1), cfg.bos_id, dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        for t in range(int(max_lens.max()) + 1):
            logp = run_session(step, {"memory": memory, "mask": mask, "tgt": tgt})[0]  # (B, V)
            nxt = logp.argmax(-1)
            nxt = np.where(t >= max_lens.numpy(), cfg.eos_id, nxt)  # at the limit, only eos
            nxt = np.where(done, cfg.eos_id, nxt)
            tgt = np.concatenate([tgt, nxt[:, None]], axis=1)
            done |= nxt == cfg.eos_id
            if done.all():
                break
        rows = tgt[:, 1:].tolist()
        return [r[: r.index(cfg.eos_id)] if cfg.eos_id in r else r for r in rows]


class _OnnxCache:
    """The keys and values the decode-step graph returns, kept as arrays between its calls."""

    def __init__(self, size: int) -> None:
        self.size, self.length = size, 0
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None


class OnnxCachedDecoder:
    """ONNX Runtime's cached decoding in the shape `bigmodel.sampling.generate` calls a net:
    `new_cache(batch, size)`, then `(idx, cache=)` -> logits (B, T, V), the prompt through the
    prefill graph and each new token through the decode-step graph; without a cache (past the
    context), the whole-window graph."""

    def __init__(self, sessions: dict, window) -> None:
        self.sessions, self.window = sessions, window

    def new_cache(self, batch: int, size: int) -> _OnnxCache:
        return _OnnxCache(size)

    def __call__(self, idx: torch.Tensor, cache=None, pad_mask=None) -> torch.Tensor:
        if pad_mask is not None:
            raise ValueError("the ONNX decoding graphs take no padding mask")
        if cache is None:
            return self.window(idx)
        if cache.keys is None:
            logits, keys, values = run_session(self.sessions["prefill"], {"idx": idx.numpy()})
        else:
            feed = {"idx": idx.numpy(), "keys": cache.keys, "values": cache.values}
            logits, keys, values = run_session(self.sessions["decode_step"], feed)
        cache.keys, cache.values, cache.length = keys, values, keys.shape[3]
        return torch.from_numpy(logits)[:, None, :]  # (B, 1, V): the last position's
