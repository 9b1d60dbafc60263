"""What selfpruner asks of a Kubernetes cluster: the Jobs it creates, as plain dicts.

Pure functions of the PruneJob, with no API client: the operator and the controller
create these objects; the tests validate them against Kubernetes' own schemas.
"""
