"""Built-in node kinds, one module each; device knowledge lives in profiles/*.yaml."""
