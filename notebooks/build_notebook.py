"""Writes inspect_rollouts.ipynb from the cells below (the notebook is generated so it stays reviewable as code).

    python notebooks/build_notebook.py
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Inspect a GRPO run: what did the model actually write?

Point `RUN_DIR` at a run directory made by `grpo train`. The notebook reads only the run's records:
`metrics.jsonl`, `rollouts/step-*.parquet` (one row per completion) and `eval/step-*.parquet`.
It runs top to bottom without edits; the environment variable `GRPO_RUN_DIR` overrides the default."""),
    ("code", """import os

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from grpo.commands.view import (conversation, group_summary, group_table, load_run, pass_at_k_table,
                               prompt_history, summary)

RUN_DIR = os.environ.get("GRPO_RUN_DIR", "../runs/smollm2-135m-arith")
pd.set_option("display.max_colwidth", 120)
run = load_run(RUN_DIR)
m = run.train_metrics
pd.Series(summary(run))"""),
    ("md", "## Curves\nTotal reward and each reward function, completion length, groups with no signal, truncation, "
           "reward errors and timeouts, held-out accuracy."),
    ("code", """fig, ax = plt.subplots(2, 3, figsize=(15, 7))
ax[0, 0].plot(m["step"], m["reward/mean"], label="total", lw=2)
for name in run.reward_names:
    if f"reward/{name}/mean" in m:
        ax[0, 0].plot(m["step"], m[f"reward/{name}/mean"], label=name, alpha=0.7)
ax[0, 0].set_title("reward"); ax[0, 0].legend()
ax[0, 1].plot(m["step"], m["completion/len_mean"]); ax[0, 1].set_title("completion length (tokens)")
ax[0, 2].plot(m["step"], m["groups/zero_variance_frac"]); ax[0, 2].set_title("zero-variance groups (fraction)")
ax[1, 0].plot(m["step"], m["completion/truncated_frac"]); ax[1, 0].set_title("truncated (fraction)")
ax[1, 1].plot(m["step"], m["reward/errors"], label="errors")
timeouts = [c for c in m.columns if c.endswith("/timeouts")]
for c in timeouts:
    ax[1, 1].plot(m["step"], m[c], label=c)
ax[1, 1].set_title("reward errors / timeouts"); ax[1, 1].legend()
ev = run.metrics.dropna(subset=["eval/accuracy"]) if "eval/accuracy" in run.metrics else pd.DataFrame()
if not ev.empty:
    ax[1, 2].plot(ev["step"], ev["eval/accuracy"], marker="o")
ax[1, 2].set_title("held-out accuracy")
for a in ax.flat:
    a.set_xlabel("step")
plt.tight_layout(); plt.show()"""),
    ("md", "## One group side by side\nThe G completions of one prompt with each reward, the advantage and the "
           "finish reason. `STEP` and `PROMPT_ID` pick another group; by default the last step's most "
           "informative group (largest reward spread)."),
    ("code", """groups = group_summary(run)
STEP = int(groups["step"].iloc[0])
PROMPT_ID = groups.sort_values("reward_std", ascending=False)["prompt_id"].iloc[0]
row = groups.set_index("prompt_id").loc[PROMPT_ID]
print(f"step {STEP}  prompt {PROMPT_ID}  answer {row['answer']}\\n{row['prompt']}")
display(group_table(run, STEP, PROMPT_ID))"""),
    ("md", "## Tool calls, turn by turn\nFor runs with `rollout.tools`: one completion of the group above that "
           "called a tool, each turn with its tool, arguments, answer or error, and the call's seconds."),
    ("code", """table = group_table(run, STEP, PROMPT_ID)
callers = table[table["tool_calls"] > 0] if "tool_calls" in table else table.iloc[0:0]
if callers.empty:
    print("no completion of this group called a tool")
else:
    display(conversation(run, STEP, PROMPT_ID, int(callers["sample_index"].iloc[0])))"""),
    ("md", "## Filters\nGroups with no signal, truncated completions, reward errors, the highest and lowest "
           "advantages, and a text search over completions."),
    ("code", """r = run.rollouts
print("zero-variance groups at the last step:")
display(groups[groups["zero_variance"]][["prompt_id", "answer", "reward_mean", "truncated"]].head(10))
print("truncated completions:")
display(r[r["finish_reason"] == "length"][["step", "prompt_id", "completion", "reward_total"]].tail(5))
print("reward errors:")
display(r[r["reward_error"]][["step", "prompt_id", "completion"]].head(5))
print("highest advantages:")
display(r.nlargest(5, "advantage")[["step", "prompt_id", "completion", "reward_total", "advantage"]])
print("lowest advantages:")
display(r.nsmallest(5, "advantage")[["step", "prompt_id", "completion", "reward_total", "advantage"]])
SEARCH = "="
hits = r[r["completion"].str.contains(SEARCH, regex=False)]
print(f"{len(hits)} completions contain {SEARCH!r}")
display(hits[["step", "prompt_id", "completion", "reward_total"]].head(5))"""),
    ("md", "## The same prompt across steps\nHow the answers to one prompt changed as training went on "
           "(the prompt sampled most often)."),
    ("code", """pid = r.groupby("prompt_id")["step"].nunique().idxmax()
hist = prompt_history(run, pid)
print(pid, "sampled at steps", sorted(hist["step"].unique()))
display(hist.groupby("step").head(3))"""),
    ("md", "## Length against reward"),
    ("code", """fig, ax = plt.subplots(1, 2, figsize=(12, 4))
ax[0].scatter(r["num_tokens"], r["reward_total"], s=6, alpha=0.3)
ax[0].set_xlabel("completion tokens"); ax[0].set_ylabel("total reward")
by_len = r.groupby("num_tokens")["reward_total"].mean()
ax[1].bar(by_len.index, by_len.values); ax[1].set_xlabel("completion tokens"); ax[1].set_ylabel("mean reward")
plt.tight_layout(); plt.show()"""),
    ("md", "## Where the sampling engine and the trainer disagree\nMean logprob per completion from the engine "
           "that sampled it and from the trainer that scored it. On the diagonal they agree."),
    ("code", """cols = ["engine_logprob_mean", "trainer_logprob_mean"]
both = r.dropna(subset=cols) if set(cols) <= set(r.columns) else r.iloc[0:0]
if both.empty:
    print("this run recorded no trainer logprobs")
else:
    gap = (both["engine_logprob_mean"] - both["trainer_logprob_mean"]).abs()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(both["engine_logprob_mean"], both["trainer_logprob_mean"], s=6, alpha=0.4)
    lo = min(both["engine_logprob_mean"].min(), both["trainer_logprob_mean"].min())
    ax.plot([lo, 0], [lo, 0], "k--", lw=1)
    ax.set_xlabel("engine mean logprob"); ax.set_ylabel("trainer mean logprob"); plt.show()
    print(f"mean |gap| {gap.mean():.2e}, max {gap.max():.2e}")
    display(both.assign(gap=gap).nlargest(5, "gap")[["step", "prompt_id", "completion", "gap"]])"""),
    ("md", "## pass@k on the held-out split\nUnbiased estimator from the eval records (k up to the samples per "
           "problem; greedy evals give pass@1)."),
    ("code", """pk = pass_at_k_table(run.evals)
display(pk)
if not pk.empty:
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, d in pk.groupby("k"):
        ax.plot(d["step"], d["pass@k"], marker="o", label=f"pass@{k}")
    ax.set_xlabel("step"); ax.legend(); plt.show()"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    out = Path(__file__).with_name("inspect_rollouts.ipynb")
    nbformat.write(build(), out)
    print(out)
