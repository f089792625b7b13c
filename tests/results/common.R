# Shared by the make_<name>.R scripts beside this file (run from this folder: make references).

suppressPackageStartupMessages(library(jsonlite))

# R's glm stops when the deviance changes by less than epsilon (1e-8) relative, and takes its
# standard errors from the IRLS weights of the iterate before the last. Both are tightened:
# epsilon 1e-14, then one more fit started at the converged coefficients, whose weights (and so
# whose standard errors and sandwich pieces) are those of the converged coefficients.
EXACT <- glm.control(epsilon = 1e-14, maxit = 200)

glm_exact <- function(formula, family, data, weights = NULL) {
  data$.w <- if (is.null(weights)) rep(1, nrow(data)) else weights
  first <- glm(formula, family = family, data = data, weights = .w, control = EXACT)
  fit <- glm(formula, family = family, data = data, weights = .w, control = EXACT,
             start = coef(first))
  if (!fit$converged || anyNA(coef(fit))) stop("glm did not converge to a full-rank fit")
  fit
}

# jsonlite 1.8 writes at most 15 significant digits even with digits = NA, so doubles are
# written here with 17 (enough to read back the same double) and passed through verbatim.
full_precision <- function(x) {
  if (is.list(x)) {
    return(lapply(x, full_precision))
  }
  if (is.double(x)) {
    if (!is.null(names(x))) return(lapply(as.list(x), full_precision))
    text <- ifelse(is.na(x), "null", sprintf("%.17g", x))
    return(structure(if (length(x) == 1) text else paste0("[", paste(text, collapse = ","), "]"),
                     class = "json"))
  }
  x
}

write_reference <- function(result, name, script, packages) {
  versions <- lapply(setNames(packages, packages), function(p) as.character(packageVersion(p)))
  out <- c(list(made_by = paste0("tests/results/", script), input = paste0(name, "_input.csv"),
                r_version = R.version.string, packages = versions), result)
  text <- toJSON(full_precision(out), auto_unbox = TRUE, json_verbatim = TRUE, pretty = TRUE,
                 digits = NA, null = "null", na = "null")
  writeLines(text, paste0(name, ".json"))
  cat(sprintf("%s.json written\n", name))
}

# Coefficients and standard errors as named lists (R's term names: the tests translate them).
coef_table <- function(fit, vcov_matrix) {
  list(estimate = as.list(coef(fit)), std_error = as.list(sqrt(diag(vcov_matrix))))
}
