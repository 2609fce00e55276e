"""One line chart for the benchmark scripts (matplotlib, imported only when a plot is asked for)."""


def line_chart(path, xs, series, xlabel, ylabel, title, log2_x=False, bands=None):
    """``series``: {label: ys}; ``bands``: optional {label: (lows, highs)} shaded around a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
        if bands and label in bands:
            ax.fill_between(xs, *bands[label], alpha=0.2)
    if log2_x:
        ax.set_xscale("log", base=2)
    else:
        ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
