"""The lark grammar and the editor grammars, shipped as package data (`rlhfc_grammar`)."""
