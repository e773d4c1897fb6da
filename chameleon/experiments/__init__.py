"""What the kit measures and how it reports it: the regime tables (`compare`), the two domains experiments
(`domains`, `domains_control`), the sweep engine and its run locks (`sweeps`, `locks`), the tables and paired
differences (`report`), the generated text (`results`), the notebooks' helpers (`analysis`, `notebooks`) and figures
(`plots`)."""
