"""check.*: message checks used in an endpoint's ``check { }`` block (Check role)."""
