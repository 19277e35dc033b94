"""Reliability scripts run against a real `armt serve`: crash consistency (crash_harness), load (loadgen) and
soak (soak). Each prints a summary and writes JSON; README "Reliability" quotes their figures."""
