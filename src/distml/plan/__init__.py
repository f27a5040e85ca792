"""Planning: per-rank memory and step time of each strategy and degree split, predicted
from one step traced on the meta device and checked against measurement."""
