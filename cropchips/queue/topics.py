"""The one place for the queue's layout: topic names, partitions and the workers' group (the seed's values).

* tasks (``satellite-tasks``, 10 partitions, key = cell id): one task per cell, from the master;
* results (``satellite-results``, 1 partition): the run header from the master, then one result per
  task from the workers (key = task id);
* dead letters (``satellite-tasks-dlq``, 1 partition): tasks that can never succeed, unchanged, with
  the reason in their headers.

Every name is a flag (``--tasks-topic`` ...) whose default is here.
"""

DEFAULT_BOOTSTRAP_SERVERS = "localhost:9092"
DEFAULT_TASKS_TOPIC = "satellite-tasks"
DEFAULT_RESULTS_TOPIC = "satellite-results"
DEFAULT_DLQ_TOPIC = "satellite-tasks-dlq"
DEFAULT_GROUP_ID = "satellite-workers"
DEFAULT_TASKS_PARTITIONS = 10
