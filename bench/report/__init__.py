"""What a person reads: the view of a results folder (`view`), the summary tables that
`certbench show` prints (`summary`), the HTML and Markdown report with its figures
(`build`) and the comparison of two results folders (`compare`). This part reads results
through the store only, never through the run machinery."""
