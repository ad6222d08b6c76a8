"""Trainers on accelerate + PEFT: one trainer core, each method a loss plugged into it."""
