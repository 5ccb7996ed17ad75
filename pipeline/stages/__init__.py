"""One module per Snakemake rule, named as the rule: thin command-line entry points. Nothing
imports a stage."""
