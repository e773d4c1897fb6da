from chameleon import Config
from chameleon.compare import summary, to_markdown
from chameleon.runs import finished_runs
cfg = Config.from_profile("cpu", protocol="paper", max_length=160)
runs = [r for r in finished_runs(cfg) if r["config"]["seed"] in (0, 1, 2)]
order = ["unadapted", "lora", "lora_matched", "chameleon"]
runs.sort(key=lambda r: (order.index(r["config"]["regime"]), r["config"]["conditioning"], r["config"]["seed"]))
table = summary(runs)
text = ("Produced by `PYTHONPATH=. python results/cpu/lm/paper-length-160-partial.py` (summary(finished_runs(Config.from_profile('cpu', protocol='paper', "
        "max_length=160)))): the runs of `python -m chameleon compare --profile cpu --experiment paper-length --seeds 3 "
        "--lengths 160` that had FINISHED when the deadline came (that command was stopped; seeds finished per row are listed below "
        "the table). Mean ± standard deviation over the finished seeds; seconds = training wall time on a shared, "
        "heavily loaded 2-core machine.\n\n" + to_markdown(table) + "\n\nSeeds finished: "
        + "; ".join(f"{r.regime} {r.conditioning}: {r.seeds}" for r in table.itertuples()) + "\n")
open("results/cpu/lm/paper-length-160-partial.md", "w").write(text)
table.to_csv("results/cpu/lm/paper-length-160-partial.csv", index=False)
print(text)
