"""Train the benchmark's sentence encoder: a small BERT-style transformer on synthetic sentences.

Run once by hand (needs torch, numpy and onnx; onnxruntime for the export check):

    python benchmarks/train_encoder.py

Writes, into ``benchmarks/models/``:
    encoder.onnx        opset 17; inputs ``input_ids``, ``attention_mask`` int64 [batch, sequence];
                        outputs ``embedding`` float32 [batch, 128] (mean-pooled over the mask,
                        L2-normalized) and ``logits`` float32 [batch, 24] (the subject's entity)
    encoder_calib.npz   64 sentences of meanings seen in training, padded to 32 tokens
    encoder_eval.npz    64 sentences of held-out meanings, padded to 32 tokens, plus ``label``

The language: a meaning is (subject, verb, object, modifier, negation) over 24 entities, 16 verbs
and 12 modifiers (or none). A sentence says it in active voice ("S [not] V O"), passive voice
("O was [not] V by S") or as a cleft ("it was S that [not] V O"), with one of three synonyms per
entity and verb, filler words (meaningless, like determiners and adjectives) sprinkled around, and
the modifier phrase at the start or the end. So word order, one marker word ("was", "by") and
one negation word all change what a sentence means, and surface words that differ may not.

The encoder learns it with two objectives: a contrastive one (two sentences of one meaning close,
the other meanings of the batch and a hard negative per meaning, with subject and object swapped,
negation flipped or the verb or modifier changed, far) on the ``embedding``, and the subject's
identity from ``logits``, which needs the voice to be read. The attention mask is applied the way
Hugging Face's BERT does it: ``(1 - mask) * finfo(float32).min`` added to the attention scores.

Seeds are fixed; a rerun on the same torch build reproduces the files.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
OUT_DIR = Path(__file__).resolve().parent / "models"
MAX_LEN = 32  # padded length of the saved samples; the model takes any length up to POSITIONS
POSITIONS = 64
N_CALIB = N_EVAL = 64
N_HELD_OUT = 512  # held-out meanings for the float accuracy figures
STEPS = 400
BATCH = 32  # meanings per step; each gives two paraphrases and one hard negative
THREADS = 2

# --------------------------------------------------------------------------
# The synthetic language

PAD, CLS, SEP, WAS, BY, NOT, IT, THAT = range(8)
N_ENTITIES, N_VERBS, N_MODIFIERS, SYNONYMS = 24, 16, 12, 3
N_PREPOSITIONS, N_FILLERS = 4, 40
ENTITY0 = 8
VERB0 = ENTITY0 + N_ENTITIES * SYNONYMS
MODIFIER0 = VERB0 + N_VERBS * SYNONYMS
PREPOSITION0 = MODIFIER0 + N_MODIFIERS * 2
FILLER0 = PREPOSITION0 + N_PREPOSITIONS
VOCAB = FILLER0 + N_FILLERS
NO_MODIFIER = N_MODIFIERS


def held_out(subject: int, verb: int, obj: int) -> bool:
    """One (subject, verb, object) triple in eight is never trained on."""
    return (7 * subject + 3 * verb + obj) % 8 == 0


def sample_meaning(rng: np.random.Generator, held: bool) -> tuple[int, int, int, int, int]:
    """A random meaning (subject, verb, object, modifier, negated) from the held-out set or not."""
    while True:
        subject, obj = rng.choice(N_ENTITIES, 2, replace=False)
        verb = int(rng.integers(N_VERBS))
        if held_out(subject, verb, obj) == held:
            modifier = int(rng.integers(N_MODIFIERS + 1))
            return int(subject), verb, int(obj), modifier, int(rng.random() < 0.3)


def perturb(rng: np.random.Generator, meaning: tuple) -> tuple:
    """A different meaning that shares most words with ``meaning`` (a hard negative)."""
    subject, verb, obj, modifier, negated = meaning
    kind = rng.integers(4)
    if kind == 0:
        return obj, verb, subject, modifier, negated
    if kind == 1:
        return subject, verb, obj, modifier, 1 - negated
    if kind == 2:
        return subject, (verb + 1 + int(rng.integers(N_VERBS - 1))) % N_VERBS, obj, modifier, negated
    return subject, verb, obj, (modifier + 1 + int(rng.integers(N_MODIFIERS))) % (N_MODIFIERS + 1), negated


def _fillers(rng: np.random.Generator, most: int) -> list[int]:
    return [FILLER0 + int(f) for f in rng.integers(N_FILLERS, size=int(rng.integers(most + 1)))]


def realize(rng: np.random.Generator, meaning: tuple) -> list[int]:
    """One random sentence (token ids, with [CLS] and [SEP]) saying ``meaning``."""
    subject, verb, obj, modifier, negated = meaning

    def entity(e: int) -> list[int]:
        return _fillers(rng, 2) + [ENTITY0 + e * SYNONYMS + int(rng.integers(SYNONYMS))]

    verb_word = VERB0 + verb * SYNONYMS + int(rng.integers(SYNONYMS))
    negation = [NOT] if negated else []
    voice = rng.choice(3, p=[0.5, 0.3, 0.2])
    if voice == 0:
        words = entity(subject) + negation + [verb_word] + entity(obj)
    elif voice == 1:
        words = entity(obj) + [WAS] + negation + [verb_word, BY] + entity(subject)
    else:
        words = [IT, WAS] + entity(subject) + [THAT] + negation + [verb_word] + entity(obj)
    if modifier != NO_MODIFIER:
        phrase = [PREPOSITION0 + int(rng.integers(N_PREPOSITIONS)), MODIFIER0 + 2 * modifier + int(rng.integers(2))]
        words = phrase + words if rng.random() < 0.5 else words + phrase
    words += _fillers(rng, 4)
    return [CLS, *words[: MAX_LEN - 2], SEP]


def pad(sentences: list[list[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 [n, length], padded on the right with [PAD] and mask 0."""
    length = length or max(map(len, sentences))
    ids = np.full((len(sentences), length), PAD, np.int64)
    mask = np.zeros((len(sentences), length), np.int64)
    for row, sentence in enumerate(sentences):
        ids[row, : len(sentence)] = sentence
        mask[row, : len(sentence)] = 1
    return ids, mask


# --------------------------------------------------------------------------
# The model


class Layer(nn.Module):
    """A post-LayerNorm BERT layer: multi-head self-attention and a GELU feed-forward block."""

    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Linear(hidden, ffn)
        self.output = nn.Linear(ffn, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + additive_mask
        context = scores.softmax(dim=-1) @ v
        context = context.transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        x = self.attention_norm(x + self.attention_out(context))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class Encoder(nn.Module):
    """Token and position embeddings, BERT layers, mean pooling over the mask, two heads.

    No dropout: every training batch is freshly generated, so there is nothing to overfit, and
    the short training on two CPU cores converges faster without it.
    """

    def __init__(self, hidden: int = 128, layers: int = 3, heads: int = 4, ffn: int = 512):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, hidden, padding_idx=PAD)
        self.positions = nn.Embedding(POSITIONS, hidden)
        self.register_buffer("position_ids", torch.arange(POSITIONS)[None], persistent=False)
        self.embedding_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(Layer(hidden, heads, ffn) for _ in range(layers))
        self.classifier = nn.Linear(hidden, N_ENTITIES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.position_ids[:, : input_ids.size(1)]
        x = self.embedding_norm(self.tokens(input_ids) + self.positions(positions))
        # As transformers' BertModel.get_extended_attention_mask: 0 to keep, float min to drop.
        mask = attention_mask[:, None, None, :].to(x.dtype)
        additive_mask = (1.0 - mask) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, additive_mask)
        weights = attention_mask[:, :, None].to(x.dtype)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1), self.classifier(pooled)


# --------------------------------------------------------------------------
# Training and evaluation


def _batch(rng: np.random.Generator, meanings: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Two paraphrases and one hard negative per meaning, stacked, with the subjects."""
    sentences = [realize(rng, m) for m in meanings]
    sentences += [realize(rng, m) for m in meanings]
    sentences += [realize(rng, perturb(rng, m)) for m in meanings]
    ids, mask = pad(sentences)
    subjects = torch.tensor([m[0] for m in meanings] * 2)
    return torch.from_numpy(ids), torch.from_numpy(mask), subjects


def _contrastive_loss(embeddings: torch.Tensor, n: int, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE: each first paraphrase against all second paraphrases and all hard negatives."""
    anchors, positives, negatives = embeddings[:n], embeddings[n : 2 * n], embeddings[2 * n :]
    similarity = anchors @ torch.cat([positives, negatives]).T / temperature
    reverse = positives @ torch.cat([anchors, negatives]).T / temperature
    target = torch.arange(n)
    return (F.cross_entropy(similarity, target) + F.cross_entropy(reverse, target)) / 2


def train(model: Encoder, rng: np.random.Generator) -> float:
    """Train for ``STEPS`` steps; return the seconds it took."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warmup = STEPS // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (STEPS - step) / (STEPS - warmup))
    )
    model.train()
    start = time.perf_counter()
    for step in range(STEPS):
        ids, mask, subjects = _batch(rng, [sample_meaning(rng, held=False) for _ in range(BATCH)])
        embeddings, logits = model(ids, mask)
        contrastive = _contrastive_loss(embeddings, BATCH)
        classification = F.cross_entropy(logits[: 2 * BATCH], subjects)
        loss = contrastive + classification
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1:5d}  contrastive {contrastive.item():.3f}  subject {classification.item():.3f}"
                  f"  {time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def held_out_accuracy(model: Encoder, rng: np.random.Generator) -> dict[str, float]:
    """Float figures on ``N_HELD_OUT`` held-out meanings: subject top-1, paraphrase retrieval
    top-1 among all second paraphrases and hard negatives, and mean cosines."""
    meanings = [sample_meaning(rng, held=True) for _ in range(N_HELD_OUT)]
    ids, mask, subjects = _batch(rng, meanings)
    embeddings, logits = model(ids, mask)
    n = N_HELD_OUT
    anchors, candidates = embeddings[:n], embeddings[n:]
    similarity = anchors @ candidates.T
    return {
        "subject top-1": (logits[: 2 * n].argmax(1) == subjects).float().mean().item(),
        "retrieval top-1": (similarity.argmax(1) == torch.arange(n)).float().mean().item(),
        "cosine paraphrase": similarity.diagonal().mean().item(),
        "cosine hard negative": similarity[:, n:].diagonal().mean().item(),
        "cosine other meaning": ((similarity[:, :n].sum() - similarity.diagonal().sum()) / (n * (n - 1))).item(),
    }


def export(model: Encoder, path: Path) -> None:
    # The TorchScript exporter (dynamo=False) gives the plain graph that tools such as optimum
    # produce for BERT models, with the mask path as Cast, Sub, Mul by float min, Add.
    ids, mask = pad([[CLS, ENTITY0, VERB0, ENTITY0 + 3, SEP]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding", "logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
                "logits": {0: "batch"},
            },
            do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_with_onnxruntime(path: Path, model: Encoder, feeds: list[dict[str, np.ndarray]]) -> None:
    """Print the largest |ORT - torch| over the outputs for each feed; fail above 1e-4."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, feed in feeds:
        with torch.no_grad():
            expected = [t.numpy() for t in model(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask")))]
        got = session.run(["embedding", "logits"], feed)
        diffs = [float(np.abs(g - e).max()) for g, e in zip(got, expected)]
        print(f"max |ORT - torch| on {name}: embedding {diffs[0]:.2e}, logits {diffs[1]:.2e}")
        assert max(diffs) < 1e-4, diffs


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    train_rng, eval_rng, data_rng = (np.random.default_rng((SEED, i)) for i in range(3))

    model = Encoder()
    print(f"{sum(p.numel() for p in model.parameters())} parameters, vocabulary {VOCAB}")
    seconds = train(model, train_rng)
    print(f"trained {STEPS} steps of {BATCH} meanings in {seconds:.0f} s on {THREADS} threads")
    for name, value in held_out_accuracy(model, eval_rng).items():
        print(f"held-out {name}: {value:.4f}")

    calib = [realize(data_rng, sample_meaning(data_rng, held=False)) for _ in range(N_CALIB)]
    eval_meanings = [sample_meaning(data_rng, held=True) for _ in range(N_EVAL)]
    calib_ids, calib_mask = pad(calib, MAX_LEN)
    eval_ids, eval_mask = pad([realize(data_rng, m) for m in eval_meanings], MAX_LEN)
    lengths = np.concatenate([calib_mask.sum(1), eval_mask.sum(1)])
    print(f"saved sentences: {lengths.min()}-{lengths.max()} tokens of {MAX_LEN}, mean {lengths.mean():.1f}")

    OUT_DIR.mkdir(exist_ok=True)
    path = OUT_DIR / "encoder.onnx"
    export(model, path)
    check_with_onnxruntime(path, model, [
        ("eval set (padded to 32)", {"input_ids": eval_ids, "attention_mask": eval_mask}),
        ("calibration set (padded to 32)", {"input_ids": calib_ids, "attention_mask": calib_mask}),
        ("eval set trimmed to its longest sentence", {"input_ids": eval_ids[:, : eval_mask.sum(1).max()],
                                                      "attention_mask": eval_mask[:, : eval_mask.sum(1).max()]}),
    ])
    np.savez_compressed(OUT_DIR / "encoder_calib.npz", input_ids=calib_ids, attention_mask=calib_mask)
    np.savez_compressed(OUT_DIR / "encoder_eval.npz", input_ids=eval_ids, attention_mask=eval_mask,
                        label=np.array([m[0] for m in eval_meanings], np.int64))
    print(f"wrote {path.name} ({path.stat().st_size / 1e6:.1f} MB), encoder_calib.npz, encoder_eval.npz to {OUT_DIR}")


if __name__ == "__main__":
    main()
