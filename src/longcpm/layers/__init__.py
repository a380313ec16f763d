"""nn.Modules over ops: norms, rotary embeddings, attention, MLP."""
