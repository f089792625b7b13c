"""Writes the three small CSV sites of the README's worked example (deterministic)."""

import numpy as np
import pandas as pd

rng = np.random.default_rng(2024)
for site, n in (("north", 420), ("south", 380), ("east", 300)):
    delivery = rng.choice(["face_to_face", "video", "phone"], size=n, p=[0.5, 0.3, 0.2])
    if site == "east":
        delivery = rng.choice(["face_to_face", "video"], size=n)  # east offers no phone groups
    age = rng.integers(18, 80, size=n)
    sessions = rng.poisson(6, size=n) + 1
    baseline = np.clip(rng.normal(15, 5, size=n).round(), 0, 27)
    eta = -1.0 + 0.15 * sessions - 0.06 * (baseline - 15) + np.where(delivery == "phone", -0.4, 0.0)
    improved = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
    frame = pd.DataFrame({"Record ID": [f"{site}-{i:04d}" for i in range(n)], "improved": improved,
                          "sessions": sessions, "age": age, "delivery": delivery,
                          "baseline_phq9": baseline.astype(int)})
    frame.loc[rng.choice(n, size=8, replace=False), "baseline_phq9"] = None
    frame.to_csv(f"{site}.csv", index=False)
