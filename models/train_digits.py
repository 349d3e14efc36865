"""Train the onnxq demo model: a small CNN on scikit-learn's 8x8 digits.

Run once by hand (needs torch, scikit-learn and onnx; onnxruntime optional):

    python models/train_digits.py

Writes, next to this script:
    digits_cnn.onnx  float32 model, input "input" [batch,1,8,8] -> "logits" [batch,10]
    calib.npz        "input": 128 calibration samples drawn from the train split
    eval.npz         "input", "label": the 500 held-out samples
"""

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
N_EVAL = 500
N_CALIB = 128
EPOCHS = 40
BATCH = 64
OUT_DIR = Path(__file__).resolve().parent


class DigitsCNN(nn.Module):
    """Conv/ReLU stem, a residual block, MaxPool, a channel Concat, two Linears."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.res = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.branch = nn.Conv2d(32, 16, 1)
        self.fc1 = nn.Linear(48 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = x + F.relu(self.res(x))
        x = self.pool(x)
        x = torch.cat([x, F.relu(self.branch(x))], dim=1)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def load_splits():
    """Return (x_train, y_train, x_eval, y_eval) as float32 [N,1,8,8] / int64 [N]."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=N_EVAL, stratify=y, random_state=SEED
    )
    return x_train, y_train, x_eval, y_eval


def train(model, x_train, y_train):
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(x):.4f}")
    model.eval()


def export(model, path):
    # The TorchScript exporter (dynamo=False) gives a plain graph whose
    # initializers keep the state_dict names and whose flatten stays a Flatten.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_with_onnxruntime(path, x_eval, torch_logits):
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not installed; skipping ORT comparison")
        return
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": x_eval})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"max |ORT - torch| on eval set: {max_diff:.2e}")
    assert max_diff < 1e-4, max_diff


def main():
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)

    x_train, y_train, x_eval, y_eval = load_splits()
    rng = np.random.default_rng(SEED)
    x_calib = x_train[rng.choice(len(x_train), N_CALIB, replace=False)]

    model = DigitsCNN()
    train(model, x_train, y_train)
    with torch.no_grad():
        logits = model(torch.from_numpy(x_eval)).numpy()
    acc = float((logits.argmax(1) == y_eval).mean())
    print(f"train {len(x_train)}  eval {len(x_eval)}  calib {len(x_calib)}")
    print(f"float held-out top-1 accuracy: {acc:.4f}")

    onnx_path = OUT_DIR / "digits_cnn.onnx"
    export(model, onnx_path)
    check_with_onnxruntime(onnx_path, x_eval, logits)
    np.savez_compressed(OUT_DIR / "calib.npz", input=x_calib)
    np.savez_compressed(OUT_DIR / "eval.npz", input=x_eval, label=y_eval)
    print(f"wrote {onnx_path.name}, calib.npz, eval.npz to {OUT_DIR}")


if __name__ == "__main__":
    main()
