// Package ssetest reads event streams exactly as the WHATWG HTML standard
// tells browsers to, for tests and the load harness.
package ssetest

import (
	"bufio"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Item is one thing a stream carried: a dispatched event, a comment or a
// retry field.
type Item struct {
	// Comment is the text after ":" of a comment line; IsComment tells it
	// apart from an empty comment.
	Comment   string
	IsComment bool
	// Retry is a valid retry field's value in milliseconds, or -1.
	Retry int
	// Event is set for a dispatched event.
	Event *Event
}

// Event is a dispatched event as a browser's EventSource sees it.
type Event struct {
	// Type is the event's type; "message" when the stream named none.
	Type string
	// Data is the event's data, lines joined by LF.
	Data string
	// LastEventID is the stream's last event id when the event was
	// dispatched; it is what the browser would send on reconnecting.
	LastEventID string
	// HasIDField tells whether the event itself carried an id field.
	HasIDField bool
}

// Reader parses a stream incrementally.
type Reader struct {
	r           *bufio.Reader
	started     bool
	data        strings.Builder
	hasData     bool
	eventType   string
	lastEventID string
	sawID       bool
	afterCR     bool // the last line ended with CR, so a next LF is skipped
}

// NewReader returns a Reader of the stream r.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: bufio.NewReader(r)}
}

// Next returns the next event, comment or retry field. It returns io.EOF at
// the end of the stream; an event not ended by a blank line is discarded,
// as the standard says.
func (p *Reader) Next() (Item, error) {
	for {
		line, err := p.line()
		if err != nil {
			return Item{}, err
		}
		if item, ok := p.process(line); ok {
			return item, nil
		}
	}
}

// NextEvent returns the next dispatched event, skipping comments and retry
// fields.
func (p *Reader) NextEvent() (Event, error) {
	for {
		item, err := p.Next()
		if err != nil {
			return Event{}, err
		}
		if item.Event != nil {
			return *item.Event, nil
		}
	}
}

// line reads one line ended by CRLF, LF or CR, and strips a leading BOM
// from the stream's first line.
func (p *Reader) line() (string, error) {
	var b strings.Builder
	for {
		c, err := p.r.ReadByte()
		if err != nil {
			return "", err
		}
		afterCR := p.afterCR
		p.afterCR = false
		switch c {
		case '\n':
			if afterCR {
				continue // the LF of a CRLF
			}
			return p.firstLine(b.String()), nil
		case '\r':
			// A CR ends the line at once; waiting for a possible LF
			// would hold back an event on a live stream.
			p.afterCR = true
			return p.firstLine(b.String()), nil
		default:
			b.WriteByte(c)
		}
	}
}

func (p *Reader) firstLine(line string) string {
	if !p.started {
		p.started = true
		return strings.TrimPrefix(line, "\uFEFF")
	}
	return line
}

// process interprets one line and returns an item when the line makes one.
func (p *Reader) process(line string) (Item, bool) {
	if line == "" {
		return p.dispatch()
	}
	if line[0] == ':' {
		return Item{Comment: strings.TrimPrefix(line[1:], " "), IsComment: true, Retry: -1}, true
	}
	field, value, found := strings.Cut(line, ":")
	if found {
		value = strings.TrimPrefix(value, " ")
	}
	value = decodeUTF8(value)
	switch field {
	case "event":
		p.eventType = value
	case "data":
		p.data.WriteString(value)
		p.data.WriteByte('\n')
		p.hasData = true
	case "id":
		if !strings.ContainsRune(value, 0) {
			p.lastEventID = value
			p.sawID = true
		}
	case "retry":
		if n, err := strconv.Atoi(value); err == nil && value != "" && strings.Trim(value, "0123456789") == "" {
			return Item{Retry: n}, true
		}
	}
	return Item{}, false
}

// decodeUTF8 replaces invalid UTF-8 as the Encoding standard's UTF-8 decode
// does: one U+FFFD for each maximal subpart of an invalid sequence, that is
// a lead byte and the continuation bytes that could still have completed it.
// Line breaks are ASCII, so decoding line by line equals decoding the
// stream.
func decodeUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		if r != utf8.RuneError || size > 1 {
			b.WriteString(s[i : i+size])
			i += size
			continue
		}
		b.WriteRune(utf8.RuneError)
		i += maximalSubpart(s[i:])
	}
	return b.String()
}

// maximalSubpart returns the length of the invalid sequence at the start of
// s: its lead byte and the continuation bytes that fit it.
func maximalSubpart(s string) int {
	lo, hi := byte(0x80), byte(0xBF)
	var need int
	switch c := s[0]; {
	case c >= 0xC2 && c <= 0xDF:
		need = 1
	case c == 0xE0:
		need, lo = 2, 0xA0
	case c == 0xED:
		need, hi = 2, 0x9F
	case c >= 0xE1 && c <= 0xEF:
		need = 2
	case c == 0xF0:
		need, lo = 3, 0x90
	case c == 0xF4:
		need, hi = 3, 0x8F
	case c >= 0xF1 && c <= 0xF3:
		need = 3
	}
	n := 1
	for ; n <= need && n < len(s) && s[n] >= lo && s[n] <= hi; n++ {
		lo, hi = 0x80, 0xBF
	}
	return n
}

// dispatch ends the current event as a blank line does.
func (p *Reader) dispatch() (Item, bool) {
	sawID := p.sawID
	p.sawID = false
	if !p.hasData {
		p.eventType = ""
		return Item{}, false
	}
	data := strings.TrimSuffix(p.data.String(), "\n")
	typ := p.eventType
	if typ == "" {
		typ = "message"
	}
	p.data.Reset()
	p.hasData = false
	p.eventType = ""
	return Item{Retry: -1, Event: &Event{Type: typ, Data: data, LastEventID: p.lastEventID, HasIDField: sawID}}, true
}
