import pandas as pd

from chameleon import Config
from chameleon.experiments.compare import compare, parameter_table


def test_compare_writes_one_table_with_mean_and_spread_over_seeds(tmp_path):
    cfg = Config.from_profile("smoke", backbone="gpt2-tiny", epochs=1, data_dir=tmp_path, results_dir=tmp_path)
    table = compare(cfg, seeds=2, runs=[("unadapted", "batch_mean"), ("chameleon", "shuffled")], progress=False)
    assert list(zip(table.regime, table.protocol, table.conditioning)) == [
        ("unadapted", "authors", "-"), ("chameleon", "authors", "shuffled"),
        ("unadapted", "causal", "-"), ("chameleon", "causal", "shuffled")]
    assert (table.seeds == 2).all()
    assert (table[table.regime == "chameleon"].val_loss_std > 0).all()  # init and batch order follow the seed
    folder = tmp_path / "smoke" / "lm"
    assert pd.read_csv(folder / "compare-seeds2.csv").shape[0] == 4
    assert pd.read_csv(folder / "compare-seeds2-runs.csv").shape[0] == 8
    markdown = (folder / "compare-seeds2.md").read_text()
    assert markdown.startswith("Produced by `python -m chameleon compare --profile smoke --task lm --seeds 2`")
    assert "| regime | protocol | conditioning | scored | trainable params |" in markdown and " ± " in markdown


def test_lora_matched_takes_the_rank_whose_count_is_nearest_the_hypernetworks():
    counts = parameter_table(Config.from_profile("smoke", backbone="gpt2-tiny")).set_index("regime").trainable_params
    per_rank = 64 + 50_257  # d_in + d_out of gpt2-tiny's head
    assert counts["lora_matched"] % per_rank == 0
    assert abs(counts["lora_matched"] - counts["chameleon"]) <= per_rank / 2
