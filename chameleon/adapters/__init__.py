"""What adapts the model: LoRA (`lora`), the hypernetwork that writes it per batch (`hypernetwork`), Transformer²'s
singular-value experts (`svf`), and the adapted model that holds a regime's components (`model`: `build`)."""
