"""Samplers from recent research, each a drop-in ``SchedulerMixin, ConfigMixin`` subclass (one file per method)."""
