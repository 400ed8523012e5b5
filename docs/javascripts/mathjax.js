// MathJax reads the \( \) and \[ \] that pymdownx.arithmatex (generic mode) leaves in the page.
window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
// Material's instant navigation swaps pages without a reload: typeset each new page.
document$.subscribe(() => { MathJax.typesetPromise(); });
