"""Sequence models learn: an LSTM solves the adding problem and a 2-layer Transformer encoder
learns a task that needs attention between positions. Each runs in a couple of seconds."""

import numpy as np

import distprop as dp
import distprop.nn.functional as F


def adding_problem(rng, n, steps=10):
    """Inputs (value, marker) per step; the target is the sum of the two marked values."""
    values = rng.random((n, steps))
    marks = np.zeros((n, steps))
    first = rng.integers(0, steps, n)
    second = (first + rng.integers(1, steps, n)) % steps
    marks[np.arange(n), first] = 1
    marks[np.arange(n), second] = 1
    x = np.stack([values, marks], axis=-1).astype(np.float32)
    return x, (values * marks).sum(axis=1, keepdims=True).astype(np.float32)


class AddingNet(dp.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = dp.nn.LSTM(2, 32, batch_first=True)
        self.head = dp.nn.Linear(32, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_lstm_learns_the_adding_problem():
    """>= 90% of held-out sums within 0.1 (predicting the mean gets about 30%)."""
    rng = np.random.default_rng(0)
    x_train, y_train = adding_problem(rng, 4096)
    x_test, y_test = adding_problem(rng, 512)
    net = AddingNet()
    opt = dp.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(500):
        idx = rng.integers(0, len(x_train), 64)
        loss = F.mse_loss(net(dp.tensor(x_train[idx])), dp.tensor(y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with dp.no_grad():
        pred = net(dp.tensor(x_test)).numpy()
    within = (np.abs(pred - y_test) < 0.1).mean()
    assert within >= 0.9, f"only {within:.1%} of sums within 0.1"


VOCAB, LENGTH = 8, 10


def first_token_repeats(rng, n):
    """Label 1 when the first token occurs again later in the sequence, else 0 (balanced)."""
    x = rng.integers(1, VOCAB, (n, LENGTH))
    y = rng.integers(0, 2, n)
    for i in range(n):
        rest = x[i, 1:]
        hit = rest == x[i, 0]
        while hit.any():  # remove accidental repeats, then plant one for positives
            rest[hit] = rng.integers(1, VOCAB, int(hit.sum()))
            hit = rest == x[i, 0]
        if y[i]:
            rest[rng.integers(0, LENGTH - 1)] = x[i, 0]
    return x, y


class RepeatNet(dp.nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.tokens = dp.nn.Embedding(VOCAB, width)
        self.positions = dp.nn.Embedding(LENGTH, width)
        layer = dp.nn.TransformerEncoderLayer(width, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = dp.nn.TransformerEncoder(layer, 2)
        self.head = dp.nn.Linear(width, 2)

    def forward(self, x):
        h = self.tokens(x) + self.positions(np.arange(x.shape[1]))
        return self.head(self.encoder(h).mean(dim=1))


def test_transformer_encoder_learns_first_token_repeat():
    """>= 95% held-out accuracy (chance is 50%; bag-of-tokens features cannot solve it)."""
    rng = np.random.default_rng(0)
    x_train, y_train = first_token_repeats(rng, 4096)
    x_test, y_test = first_token_repeats(rng, 512)
    net = RepeatNet()
    opt = dp.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(350):
        idx = rng.integers(0, len(x_train), 64)
        loss = F.cross_entropy(net(dp.tensor(x_train[idx])), dp.tensor(y_train[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with dp.no_grad():
        accuracy = (net(dp.tensor(x_test)).numpy().argmax(axis=1) == y_test).mean()
    assert accuracy >= 0.95, f"accuracy {accuracy:.1%}"
