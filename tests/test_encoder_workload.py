"""The benchmark's sentence encoder (``benchmarks/train_encoder.py``): the committed model and
data agree with each other, the attention mask works, and the workload's metrics are right."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.workloads import MODELS_DIR, WORKLOADS

ENCODER = WORKLOADS["encoder"]


@pytest.fixture(scope="module")
def session():
    return ort.InferenceSession(str(ENCODER.model_path()), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def eval_data():
    with np.load(MODELS_DIR / ENCODER.eval_file) as data:
        return {key: data[key] for key in data.files}


def _feed(data: dict) -> dict:
    return {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}


def test_float_encoder_names_the_subject_of_held_out_sentences(session, eval_data):
    _, logits = session.run(None, _feed(eval_data))
    accuracy = np.mean(logits.argmax(axis=1) == eval_data["label"])
    assert accuracy >= 0.9  # measured: 0.953 (61 of 64); 0.988 on 1024 held-out sentences in training


def test_embeddings_are_unit_vectors(session, eval_data):
    embedding, _ = session.run(None, _feed(eval_data))
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_padding_changes_nothing(session, eval_data):
    feed = _feed(eval_data)
    padding = feed["attention_mask"] == 0
    assert padding.any(axis=1).all()  # every saved sentence is padded
    noisy = np.where(padding, np.random.default_rng(0).integers(3, 100, padding.shape), feed["input_ids"])
    longest = int(feed["attention_mask"].sum(axis=1).max())
    trimmed = {name: array[:, :longest] for name, array in feed.items()}
    expected = session.run(None, feed)[0]
    np.testing.assert_allclose(session.run(None, {**feed, "input_ids": noisy})[0], expected, atol=1e-5)
    np.testing.assert_allclose(session.run(None, trimmed)[0], expected, atol=1e-5)


def test_workload_feeds_are_the_saved_samples_one_by_one(eval_data):
    feeds = ENCODER.eval_inputs(3)
    assert [sorted(feed) for feed in feeds] == [["attention_mask", "input_ids"]] * 3
    np.testing.assert_array_equal(feeds[2]["input_ids"], eval_data["input_ids"][2:3])
    with pytest.raises(ValueError, match="holds 64 samples"):
        ENCODER.eval_inputs(65)


def test_embedding_cosine_and_top1_agreement():
    rng = np.random.default_rng(1)
    reference = [[rng.normal(size=(1, 8)), rng.normal(size=(1, 5))] for _ in range(4)]
    quantized = [[e + rng.normal(scale=0.5, size=e.shape), logits.copy()] for e, logits in reference]
    quantized[0][1][0, reference[0][1].argmax()] = -10.0  # sample 0: another class wins
    quantized[1][0] = np.zeros_like(reference[1][0])  # sample 1: the embedding collapsed
    cosines = [
        0.0 if not q[0].any() else float(np.sum(r[0] * q[0]) / np.sqrt(np.sum(r[0] ** 2) * np.sum(q[0] ** 2)))
        for r, q in zip(reference, quantized)
    ]
    assert ENCODER.task_metric(reference, quantized) == pytest.approx(np.mean(cosines))
    assert ENCODER.task_metric(reference, reference) == pytest.approx(1.0)
    assert ENCODER.extra_metrics(reference, quantized) == {"logits top-1 agreement": 0.75}
