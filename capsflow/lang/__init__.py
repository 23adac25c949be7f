"""The graph language: YAML reading, composition (include, extends, fragments), variables and repeat unrolling."""
