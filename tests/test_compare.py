import pandas as pd

from chameleon import Config
from chameleon.compare import PAPER_TABLE, compare, parameter_table


def test_compare_writes_one_table_with_mean_and_spread_over_seeds(tmp_path):
    cfg = Config.from_profile("smoke", backbone="gpt2-tiny", epochs=1, data_dir=tmp_path, results_dir=tmp_path)
    table = compare(cfg, seeds=2, runs=[("unadapted", "batch_mean"), ("chameleon", "shuffled")], progress=False)
    assert list(zip(table.regime, table.protocol, table.conditioning)) == [
        ("unadapted", "paper", "-"), ("chameleon", "paper", "shuffled"),
        ("unadapted", "causal", "-"), ("chameleon", "causal", "shuffled")]
    assert (table.seeds == 2).all()
    assert (table[table.regime == "chameleon"].val_loss_std > 0).all()  # init and batch order follow the seed
    folder = tmp_path / "smoke" / "lm"
    assert pd.read_csv(folder / "compare-seeds2.csv").shape[0] == 4
    assert pd.read_csv(folder / "compare-seeds2-runs.csv").shape[0] == 8
    markdown = (folder / "compare-seeds2.md").read_text()
    assert markdown.startswith("Produced by `python -m chameleon compare --profile smoke --task lm --seeds 2`")
    assert "| regime | protocol | conditioning | scored | trainable params |" in markdown and " ± " in markdown


def test_parameter_table_reproduces_the_papers_counts_and_matches_the_lora_rank():
    counts = parameter_table(Config.from_profile("smoke", backbone="gpt2-arch", rank=4)).set_index("regime").trainable_params
    assert PAPER_TABLE.set_index("regime").trainable_params.to_dict() == counts[["unadapted", "lora", "chameleon"]].to_dict()
    # lora_matched: the head rank whose count is nearest the hypernetwork's, so within half a rank of it
    assert abs(counts["lora_matched"] - counts["chameleon"]) <= (768 + 50_257) / 2
