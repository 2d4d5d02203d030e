// Loaded right after the vendored mermaid. material calls mermaid.initialize() with its own
// theme settings when a page has a diagram; this adds ours on top.
//
// Sequence diagrams are drawn at their natural size instead of being shrunk to the text
// column: eight participants squeezed into ~700 px gave ~6 px labels. The diagram's box
// scrolls sideways instead (see .mermaid in extra.css).
(function () {
  if (typeof mermaid === "undefined") return;
  const initialize = mermaid.initialize.bind(mermaid);
  mermaid.initialize = function (config) {
    const sequence = Object.assign({}, (config || {}).sequence, {
      useMaxWidth: false,
      actorFontSize: "13px",
      messageFontSize: "13px",
      noteFontSize: "13px",
      actorMargin: 30,
    });
    return initialize(Object.assign({}, config, { sequence: sequence }));
  };
})();
