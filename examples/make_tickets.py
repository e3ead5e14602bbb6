"""A small support-ticket table with free text, synthesised (seeded): does a ticket get escalated? Written next to
examples/tickets.yaml, as a team's own CSV would sit there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

URGENT = ("refund", "broken", "cancel", "crash", "charged twice", "lawyer", "outage", "furious")
NEUTRAL = ("thanks", "question", "hello", "invoice", "update", "password", "login", "address", "plan", "help")
FILLER = ("please", "my", "account", "the", "app", "since", "yesterday", "again", "order", "today", "still")


def tickets(rows: int = 3000, seed: int = 5) -> pd.DataFrame:
    """Tickets: `message` (free text, 2% missing), `account_age_days`, `channel`, and `escalated` (0/1), which
    depends on the urgent phrases in the message, the account's age and the channel."""
    rng = np.random.default_rng(seed)
    urgent = rng.poisson(0.8, rows)
    messages = []
    for k in urgent:
        words = list(rng.choice(NEUTRAL, rng.integers(1, 4))) + list(rng.choice(FILLER, rng.integers(2, 8)))
        words += list(rng.choice(URGENT, k))
        rng.shuffle(words)
        messages.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ""]))
    age = rng.gamma(2.0, 200.0, rows).round()
    channel = rng.choice(["email", "chat", "phone"], rows, p=[0.5, 0.35, 0.15])
    logit = -2.0 + 2.5 * urgent - 0.001 * (age - 400) + np.where(channel == "phone", 0.6, 0.0)
    frame = pd.DataFrame({"message": messages, "account_age_days": age, "channel": channel,
                          "escalated": (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)})
    frame.loc[rng.random(rows) < 0.02, "message"] = None
    return frame


if __name__ == "__main__":
    path = Path(__file__).resolve().parent / "tickets.csv"
    tickets().to_csv(path, index=False)
    print("wrote", path)
