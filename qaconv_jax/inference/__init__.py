"""Using a trained model outside evaluation: restore it, index image folders, search them,
and export it (the command lines are `qaconv_jax.index`, `qaconv_jax.search` and
`qaconv_jax.export`)."""
