"""The PruneJob operator: a thin kopf layer over the selfpruner package.

It validates a PruneJob, starts its controller Job, mirrors that Job into the
PruneJob's phase and conditions, restarts a lost controller (which resumes from
storage) within a budget, and honours `suspend`. The search itself runs in the
controller pod; nothing here imports torch.
"""
