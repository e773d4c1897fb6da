"""Answering prompts with a trained run: batched decoding with one head per group (`decoding`), the `Adapter`
(`adapter`), the Hugging Face wrapper (`hf`), the HTTP server (`server`), and PEFT export with its standalone loader
(`export`, `load_export`)."""
