"""Operations run by the stateful tests, per machine (conftest prints them)."""

from collections import Counter

OPS = Counter()
