"""The default job written by hand: the reference ``benchmarks/default_job.py`` times kd against.

What ``python run.py`` computes, without kd, Lightning, Hydra or MLflow: scikit-learn's digits
split like ``kd.data.DigitsDataModule`` (20% test, 10% of the rest validation, split seed 0,
per-channel standardisation from the training split), a teacher MLP[256, 256] (dropout 0.2)
trained 40 epochs, a student MLP[32] trained 30 epochs on Hinton's loss
(``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE``, T=4, alpha=0.9, the teacher's logits
computed once), both with SGD (lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4) and a cosine
schedule over their epochs, batch 64, a validation pass per epoch keeping the best student's
weights, then both tested. It prints the two test accuracies and its wall time.

It imports only torch and scikit-learn: what a researcher would write in one sitting.
Usage: ``.venv/bin/python benchmarks/hand_default.py``.
"""

import copy
import time

START = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402


def splits():
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = round(0.2 * len(order))
    test, rest = order[:n_test], order[n_test:]
    n_val = round(0.1 * len(rest))
    val, train = rest[:n_val], rest[n_val:]
    mean, std = x[train].mean(dim=(0, 2, 3), keepdim=True), x[train].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def mlp(hidden, dropout):
    layers, width = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def fit(model, train, val, epochs, loss_of):
    x, y = train
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            loss = loss_of(model(x[idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        acc = accuracy(model, *val)
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    return best_state


def main():
    torch.manual_seed(0)
    train, val, test = splits()
    teacher = mlp([256, 256], 0.2)
    fit(teacher, train, val, 40, lambda logits, idx: F.cross_entropy(logits, train[1][idx]))  # keeps its last weights
    teacher.eval()
    with torch.no_grad():
        soft = teacher(train[0])  # the teacher's logits, once
    t, alpha = 4.0, 0.9

    def kd_loss(logits, idx):
        kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(soft[idx] / t, 1), reduction="batchmean", log_target=True)
        return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(logits, train[1][idx])

    torch.manual_seed(0)
    student = mlp([32], 0.0)
    student.load_state_dict(fit(student, train, val, 30, kd_loss))
    print(f"teacher {accuracy(teacher, *test):.2%}  student {accuracy(student, *test):.2%}  {time.perf_counter() - START:.2f} s")


if __name__ == "__main__":
    main()
