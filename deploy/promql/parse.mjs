// Reads a JSON array of PromQL expressions on stdin and prints, for each, the metric
// names it selects, its label matchers and its syntax errors, parsed with Prometheus's own
// grammar (@prometheus-io/lezer-promql). Grafana's interval variables are replaced by a
// duration first; `$var` inside label values is plain text to PromQL.
import { parser } from '@prometheus-io/lezer-promql';

const GRAFANA_INTERVALS = /\$__(rate_interval|interval|range)\b/g;

function analyse(expr) {
  let text = expr.replace(GRAFANA_INTERVALS, '5m');
  // Grafana's label_values(selector, label) is not PromQL: its selector is.
  const lv = text.match(/^\s*label_values\(([\s\S]*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$/);
  if (lv) text = lv[1];
  const out = { expr, metrics: [], matchers: [], errors: [] };
  const tree = parser.parse(text);
  let matcher = null;
  tree.iterate({
    enter(node) {
      const slice = text.slice(node.from, node.to);
      if (node.type.isError) out.errors.push(`syntax error at ${node.from}: ${JSON.stringify(text.slice(node.from, node.from + 20))}`);
      else if (node.name === 'Identifier' && node.node.parent?.name === 'VectorSelector') out.metrics.push(slice);
      else if (node.name === 'UnquotedLabelMatcher') matcher = [];
      else if (matcher && node.name === 'LabelName') matcher.push(slice);
      else if (matcher && node.name === 'MatchOp') matcher.push(slice);
      else if (matcher && node.name === 'StringLiteral') matcher.push(JSON.parse(slice.replace(/^'|'$/g, '"')));
    },
    leave(node) {
      if (node.name === 'UnquotedLabelMatcher') { out.matchers.push(matcher); matcher = null; }
    },
  });
  return out;
}

let input = '';
process.stdin.on('data', (d) => { input += d; });
process.stdin.on('end', () => {
  process.stdout.write(JSON.stringify(JSON.parse(input).map(analyse)));
});
