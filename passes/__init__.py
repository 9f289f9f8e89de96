"""FX passes over Dynamo graphs: find SDPA calls, rewrite them, profile them."""
