"""Run folders, markdown tables and matplotlib plots shared by experiments and analyses."""
