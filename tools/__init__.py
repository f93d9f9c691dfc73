"""Tools for the project itself, beside the product: ``python -m tools.figures`` draws README pictures."""
