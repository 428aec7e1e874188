"""clipfold profile: latency and accuracy of every variant and of open_clip eager on this machine, the
table, the Pareto plot, and the record --variant auto reads.

run.py (the run: config, jobs, agreement, reporting) spawns one worker per row; rows.py is the worker
side (one row measured, the eager reference rows and their names) and imports nothing of run.py.
"""
