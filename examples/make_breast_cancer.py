"""Write scikit-learn's breast cancer table next to the example policy, as a team's own CSV would sit there."""

from __future__ import annotations

from pathlib import Path

from sklearn.datasets import load_breast_cancer

if __name__ == "__main__":
    path = Path(__file__).resolve().parent / "breast_cancer.csv"
    load_breast_cancer(as_frame=True).frame.to_csv(path, index=False)
    print("wrote", path)
