"""``ilora ablate``: grids of training runs compared on the same users, and the negative-transfer analysis.

config.py    what an ablation is (axes, shared training settings, its directory)
grid.py      the cells of a grid
runner.py    train and evaluate every cell, resumably, in one ablation directory
significance.py  per-user reciprocal ranks and the paired test against the reference cell
report.py    the table, results.json and results.csv
plots.py     PNG plots (metric against each numeric axis, training-loss curves, heatmaps)
analysis.py  the gradient-conflict analysis (k-means clusters of users, LoRA gradient cosines, gates)
"""
