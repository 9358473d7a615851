"""End to end: an MLP trained by a plain loop with manual SGD learns scikit-learn's digits."""

import numpy as np
from sklearn.datasets import load_digits

import distprop as dp


def test_mlp_with_manual_sgd_reaches_95_percent_on_digits():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]

    dp.manual_seed(0)
    model = dp.nn.Sequential(dp.nn.Linear(64, 64), dp.nn.ReLU(), dp.nn.Linear(64, 10))
    loss_fn = dp.nn.CrossEntropyLoss()
    lr, batch = 0.1, 32
    rng = np.random.default_rng(1)
    first_loss = last_loss = None
    for _epoch in range(30):
        perm = rng.permutation(split)
        for start in range(0, split, batch):
            idx = perm[start : start + batch]
            loss = loss_fn(model(dp.tensor(x_train[idx])), dp.tensor(y_train[idx]))
            model.zero_grad()
            loss.backward()
            with dp.no_grad():
                for p in model.parameters():
                    p.data -= lr * p.grad.data
            first_loss = loss.item() if first_loss is None else first_loss
            last_loss = loss.item()

    model.eval()
    with dp.no_grad():
        logits = model(dp.tensor(x_test))
    accuracy = (logits.numpy().argmax(axis=1) == y_test).mean()
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert last_loss < first_loss
    print(f"digits test accuracy {accuracy:.4f}, loss {first_loss:.3f} -> {last_loss:.3f}")
    assert accuracy > 0.95, f"test accuracy {accuracy:.3f}"
